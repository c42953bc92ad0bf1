//! From decoded images to unit-norm CLIP embeddings with differentiable ops only: clamping,
//! bilinear resizing as matmuls with interpolation matrices, CLIP's normalisation.

use anyhow::Result;
use candle_core::{Device, Tensor, D};

use crate::model::clip::ClipVisionModel;

/// CLIP's per-channel pixel mean (transformers `OPENAI_CLIP_MEAN`).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// CLIP's per-channel pixel std (transformers `OPENAI_CLIP_STD`).
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The `[output, input]` matrix of torch's 1-D bilinear interpolation
/// (`F.interpolate(mode="bilinear", align_corners=False, antialias=False)` along one axis):
/// output sample `i` reads input position `max((i + 0.5) · input / output − 0.5, 0)`,
/// linearly between its two neighbours (the last one repeated at the edge).
pub fn bilinear_matrix(input: usize, output: usize) -> Vec<f64> {
    let scale = input as f64 / output as f64;
    let mut m = vec![0.0; output * input];
    for i in 0..output {
        let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(input - 1);
        let i1 = (i0 + 1).min(input - 1);
        let frac = src - i0 as f64;
        m[i * input + i0] += 1.0 - frac;
        m[i * input + i1] += frac;
    }
    m
}

/// Interpolation rows taking an axis of `input` samples to the `size` central samples of its
/// bilinear resize to `resized` samples, as a tensor like `like`.
fn resize_rows(input: usize, resized: usize, size: usize, like: &Tensor) -> Result<Tensor> {
    let m = Tensor::from_vec(bilinear_matrix(input, resized), (resized, input), &Device::Cpu)?;
    let crop = m.narrow(0, (resized - size) / 2, size)?;
    Ok(crop.to_dtype(like.dtype())?.to_device(like.device())?)
}

/// CLIP `pixel_values` `[B, 3, size, size]` from `[B, 3, H, W]` images in `[0, 1]`: clamped to
/// `[0, 1]`, the shorter side resized bilinearly to `size` and the longer one in proportion
/// (transformers' `CLIPImageProcessor` sizes, torch's bilinear weights), centre-cropped,
/// then normalised with [`CLIP_MEAN`] and [`CLIP_STD`].
pub fn pixel_values(images: &Tensor, size: usize) -> Result<Tensor> {
    let (_, c, h, w) = images.dims4()?;
    anyhow::ensure!(c == 3, "CLIP rewards need RGB images, got {c} channels");
    let short = h.min(w);
    let rows = resize_rows(h, size * h / short, size, images)?;
    let cols = resize_rows(w, size * w / short, size, images)?;
    let x = images.clamp(0.0, 1.0)?;
    let x = rows.broadcast_matmul(&x)?.broadcast_matmul(&cols.t()?)?;
    let stats = |v: [f64; 3]| -> Result<Tensor> {
        Ok(Tensor::new(&v, &Device::Cpu)?
            .to_dtype(images.dtype())?
            .to_device(images.device())?
            .reshape((1, 3, 1, 1))?)
    };
    Ok(x.broadcast_sub(&stats(CLIP_MEAN)?)?.broadcast_div(&stats(CLIP_STD)?)?)
}

/// Each row divided by its L2 norm.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?)
}

/// Unit-norm projected CLIP image embeddings `[B, projection_dim]` of `[B, 3, H, W]` images in
/// `[0, 1]`, for a vision tower of input side `image_size`.
pub fn image_features(clip: &ClipVisionModel, image_size: usize, images: &Tensor) -> Result<Tensor> {
    l2_normalize(&clip.image_embeds(&pixel_values(images, image_size)?)?)
}
