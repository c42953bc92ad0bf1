//! One classifier-free-guided noise prediction, shared by sampling and training.

use candle_core::{Result, Tensor};

use crate::lora::LoraSet;
use crate::model::unet::{Conditioning, UNet2DConditionModel};

/// Runs the UNet on `latents` (`[B, C, h, w]`, already scaled for the scheduler) and applies
/// classifier-free guidance.
///
/// `cond` has batch 2B (the B unconditional rows first) when `guidance_scale > 1`, else B
/// with the prompts alone, exactly as diffusers skips guidance at a scale of 1 or below.
pub fn guided_noise_pred(
    unet: &UNet2DConditionModel,
    latents: &Tensor,
    timestep: f64,
    cond: &Conditioning,
    guidance_scale: f64,
    lora: &LoraSet,
) -> Result<Tensor> {
    let pred = unet.forward(&guidance_input(latents, guidance_scale)?, timestep, cond, lora)?;
    combine_guidance(&pred, guidance_scale)
}

/// The UNet input for [`combine_guidance`]: the latents twice when guidance is on.
pub fn guidance_input(latents: &Tensor, guidance_scale: f64) -> Result<Tensor> {
    if uses_guidance(guidance_scale) {
        Tensor::cat(&[latents, latents], 0)
    } else {
        Ok(latents.clone())
    }
}

/// `uncond + scale · (text − uncond)` from a UNet output whose first half is unconditional.
pub fn combine_guidance(pred: &Tensor, guidance_scale: f64) -> Result<Tensor> {
    if !uses_guidance(guidance_scale) {
        return Ok(pred.clone());
    }
    let b = pred.dim(0)? / 2;
    let uncond = pred.narrow(0, 0, b)?;
    let text = pred.narrow(0, b, b)?;
    uncond.clone() + ((text - uncond)? * guidance_scale)?
}

/// Whether a guidance scale asks for the unconditional branch.
pub fn uses_guidance(guidance_scale: f64) -> bool {
    guidance_scale > 1.0
}
