//! Locating and opening safetensors weight files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::tensor_file::TensorFile;

/// The weight file of a diffusers component folder: `<stem>.safetensors`, or the
/// `<stem>.fp16.safetensors` variant when only that one exists.
pub fn find_weights(dir: &Path, stem: &str) -> Result<PathBuf> {
    let plain = dir.join(format!("{stem}.safetensors"));
    if plain.is_file() {
        return Ok(plain);
    }
    let fp16 = dir.join(format!("{stem}.fp16.safetensors"));
    if fp16.is_file() {
        return Ok(fp16);
    }
    bail!("no weights in {}: expected {stem}.safetensors", dir.display())
}

/// Opens a safetensors file as a `VarBuilder` that reads each tensor when it is asked for and
/// converts it to `dtype`: the built model holds every weight once (see [`TensorFile`]).
///
/// The header is parsed up front so a truncated or corrupt file is reported by name.
pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    Ok(VarBuilder::from_backend(Box::new(open_file(path)?), dtype, device.clone()))
}

/// [`open`] with every tensor rounded to `via` before it is converted to `dtype`: an f16
/// model's VAE that diffusers upcasts to f32 (`force_upcast`) computes with f16-rounded weights.
pub fn open_rounded(path: &Path, via: DType, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    Ok(VarBuilder::from_backend(Box::new(Rounded { file: open_file(path)?, via }), dtype, device.clone()))
}

fn open_file(path: &Path) -> Result<TensorFile> {
    if !path.is_file() {
        bail!("missing weight file {}", path.display());
    }
    TensorFile::open(path).with_context(|| format!("corrupt safetensors file {}", path.display()))
}

/// A weight file whose tensors are rounded to `via` on their way to the builder's dtype.
struct Rounded {
    file: TensorFile,
    via: DType,
}

impl SimpleBackend for Rounded {
    fn get(&self, s: Shape, name: &str, init: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.file.get(s, name, init, self.via, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.file.get_unchecked(name, self.via, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.file.contains_tensor(name)
    }
}
