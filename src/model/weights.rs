//! Locating and opening safetensors weight files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

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

/// Loads a safetensors file with every tensor rounded to `via` and held in `dtype`: an f16
/// model's VAE that diffusers upcasts to f32 (`force_upcast`) computes with f16-rounded weights.
pub fn open_rounded(path: &Path, via: DType, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let tensors = candle_core::safetensors::load(path, device)
        .with_context(|| format!("corrupt safetensors file {}", path.display()))?
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(via)?.to_dtype(dtype)?)))
        .collect::<candle_core::Result<_>>()?;
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

/// Opens a safetensors file as a `VarBuilder` that converts every tensor to `dtype` on access.
///
/// The header is parsed up front so a truncated or corrupt file is reported by name.
pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    if !path.is_file() {
        bail!("missing weight file {}", path.display());
    }
    // SAFETY: model files are not modified while the server runs; the mapping is read-only.
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device) }
        .with_context(|| format!("corrupt safetensors file {}", path.display()))
}
