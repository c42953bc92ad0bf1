//! Writing adapters in the diffusers LoRA format.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use safetensors::{Dtype, View};

/// An f32 tensor in host memory, as the safetensors writer takes it.
struct F32Tensor {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl F32Tensor {
    fn new(t: &Tensor) -> Result<Self> {
        let values = t
            .to_device(&Device::Cpu)?
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self {
            shape: t.dims().to_vec(),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
    }
}

impl View for &F32Tensor {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes UNet LoRA factors as an f32 safetensors file with the keys diffusers'
/// `load_lora_weights` reads: `unet.<path>.lora.down.weight` and `unet.<path>.lora.up.weight`.
///
/// `modules` holds `(UNet module path, down, up)`; `metadata` goes into the file header
/// (with `format: pt` unless given). The file is written to a temporary name next to `path`
/// and renamed into place, so readers never see a partial file.
pub fn save_diffusers(
    path: &Path,
    modules: &[(String, Tensor, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    if modules.is_empty() {
        bail!("no LoRA modules to save");
    }
    let mut tensors = BTreeMap::new();
    for (module, down, up) in modules {
        if down.rank() < 2 || up.rank() < 2 || down.dims()[0] != up.dims()[1] {
            bail!(
                "LoRA factors of {module} do not match: down {:?}, up {:?}",
                down.dims(),
                up.dims()
            );
        }
        let prefix = format!("unet.{module}.lora");
        if tensors
            .insert(format!("{prefix}.down.weight"), F32Tensor::new(down)?)
            .is_some()
        {
            bail!("module {module} is listed twice");
        }
        tensors.insert(format!("{prefix}.up.weight"), F32Tensor::new(up)?);
    }
    let mut metadata = metadata.clone();
    metadata
        .entry("format".to_string())
        .or_insert_with(|| "pt".to_string());

    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    static SAVES: AtomicU64 = AtomicU64::new(0);
    let unique = format!(
        "{}-{}",
        std::process::id(),
        SAVES.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = path.with_file_name(format!(".{}.tmp-{unique}", name.to_string_lossy()));
    let written = safetensors::serialize_to_file(&tensors, Some(metadata), &tmp)
        .map_err(anyhow::Error::from)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(anyhow::Error::from));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing LoRA {}", path.display()))
}
