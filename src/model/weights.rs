//! Locating and opening safetensors weight files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

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
    if !path.is_file() {
        bail!("missing weight file {}", path.display());
    }
    let file = TensorFile::open(path).with_context(|| format!("corrupt safetensors file {}", path.display()))?;
    Ok(VarBuilder::from_backend(Box::new(file), dtype, device.clone()))
}
