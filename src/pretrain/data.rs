//! Training batches from the procedural shapes dataset.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use crate::dataset::{sample, Split};

/// `[B, 3, H, W]` images in `[-1, 1]` and their captions, for dataset items
/// `first..first + batch` of `seed`.
pub fn batch(seed: u64, first: u64, batch: usize, size: usize, device: &Device) -> Result<(Tensor, Vec<String>)> {
    let mut pixels = Vec::with_capacity(batch * 3 * size * size);
    let mut captions = Vec::with_capacity(batch);
    for i in 0..batch as u64 {
        let scene = sample(Split::Train, seed, first + i);
        let img = scene.render(size as u32);
        for c in 0..3 {
            pixels.extend(img.pixels().map(|p| p.0[c] as f32 / 127.5 - 1.0));
        }
        captions.push(scene.caption());
    }
    let images = Tensor::from_vec(pixels, (batch, 3, size, size), &Device::Cpu)?.to_dtype(DType::F32)?.to_device(device)?;
    Ok((images, captions))
}
