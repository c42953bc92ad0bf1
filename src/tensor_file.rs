//! Safetensors files read one tensor at a time, with plain reads instead of a memory map: a
//! loaded model then holds each weight once, and never also the file's pages (a mapped
//! file's touched pages count in the process's resident memory until it is unmapped).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};

/// Largest safetensors header read (the format's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// An open safetensors file with its parsed header.
pub struct TensorFile {
    path: PathBuf,
    file: Mutex<File>,
    meta: Metadata,
    /// Offset of the data section (after the length prefix and the header).
    data_start: u64,
}

impl TensorFile {
    /// Opens `path` and checks that its header is consistent with the file size.
    pub fn open(path: &Path) -> Result<Self> {
        let corrupt = || format!("corrupt safetensors header in {}", path.display());
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let file_len = file.metadata()?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len).with_context(corrupt)?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER || 8 + n > file_len {
            bail!("{}: header length {n} does not fit the file", corrupt());
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).with_context(corrupt)?;
        let meta: Metadata = serde_json::from_slice(&header).with_context(corrupt)?;
        if (meta.data_len() as u64).checked_add(8 + n) != Some(file_len) {
            bail!("{}: tensor data does not match the file size (truncated?)", corrupt());
        }
        Ok(Self { path: path.to_path_buf(), file: Mutex::new(file), meta, data_start: 8 + n })
    }

    /// The `(name, shape)` of every tensor.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.meta.tensors().into_iter().map(|(name, info)| (name, info.shape.clone())).collect()
    }

    fn info(&self, name: &str) -> candle_core::Result<&TensorInfo> {
        self.meta.info(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })
    }

    /// Reads one tensor, in the file's dtype, on the CPU.
    pub fn read(&self, name: &str) -> candle_core::Result<Tensor> {
        let info = self.info(name)?;
        let dtype = match info.dtype {
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F32 => DType::F32,
            Dtype::F64 => DType::F64,
            Dtype::U8 => DType::U8,
            Dtype::U32 => DType::U32,
            Dtype::I64 => DType::I64,
            other => candle_core::bail!("{}: tensor {name} has unsupported dtype {other:?}", self.path.display()),
        };
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        {
            let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
            file.seek(SeekFrom::Start(self.data_start + start as u64))?;
            file.read_exact(&mut bytes)?;
        }
        Tensor::from_raw_buffer(&bytes, dtype, &info.shape, &Device::Cpu)
    }
}

/// Tensors are converted to the builder's dtype and device one at a time, as they are asked for.
impl SimpleBackend for TensorFile {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let stored = &self.info(name)?.shape;
        if stored.as_slice() != s.dims() {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: stored.as_slice().into(),
            }
            .bt());
        }
        self.get_unchecked(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.meta.info(name).is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn write(name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("sdserve-tensor-file-{}-{name}.safetensors", std::process::id()));
        let map: HashMap<String, Tensor> = tensors.iter().map(|(k, t)| (k.to_string(), t.clone())).collect();
        candle_core::safetensors::save(&map, &path).unwrap();
        path
    }

    #[test]
    fn reads_each_tensor_exactly_in_any_dtype() {
        let a = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((3, 4)).unwrap();
        let b = (Tensor::arange(0f32, 5.0, &Device::Cpu).unwrap() / 4.0).unwrap().to_dtype(DType::F16).unwrap();
        let path = write("dtypes", &[("a.weight", a.clone()), ("b", b.clone())]);
        let file = TensorFile::open(&path).unwrap();
        let mut shapes = file.shapes();
        shapes.sort();
        assert_eq!(shapes, vec![("a.weight".to_string(), vec![3, 4]), ("b".to_string(), vec![5])]);
        assert_eq!(file.read("a.weight").unwrap().to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        let vb = candle_nn::VarBuilder::from_backend(Box::new(file), DType::F64, Device::Cpu);
        assert!(vb.contains_tensor("b") && !vb.contains_tensor("c"));
        let b64 = vb.get(5, "b").unwrap();
        assert_eq!(b64.dtype(), DType::F64);
        assert_eq!(b64.to_vec1::<f64>().unwrap(), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        let wrong = vb.get((4, 3), "a.weight").unwrap_err().to_string();
        assert!(wrong.contains("shape mismatch for a.weight"), "{wrong}");
        let missing = vb.get(3, "c").unwrap_err().to_string();
        assert!(missing.contains("cannot find tensor c"), "{missing}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn truncated_and_garbage_files_are_errors() {
        let path = write("truncated", &[("a", Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap())]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let err = TensorFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("truncated"), "{err}");
        std::fs::write(&path, b"not a safetensors file").unwrap();
        assert!(TensorFile::open(&path).is_err());
        std::fs::remove_file(path).unwrap();
    }
}
