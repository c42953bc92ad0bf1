//! One classifier-free-guided noise prediction, shared by sampling and training.

use candle_core::{Result, Tensor};

use crate::lora::LoraSet;
use crate::model::unet::{Conditioning, UNet2DConditionModel};

/// Runs the UNet on `latents` (`[1, C, h, w]`, already scaled for the scheduler) and applies
/// classifier-free guidance.
///
/// `cond` has batch 2 (unconditional first) when `guidance_scale > 1`, else 1 with the
/// prompt alone, exactly as diffusers skips guidance at a scale of 1 or below.
pub fn guided_noise_pred(
    unet: &UNet2DConditionModel,
    latents: &Tensor,
    timestep: f64,
    cond: &Conditioning,
    guidance_scale: f64,
    lora: &LoraSet,
) -> Result<Tensor> {
    if !uses_guidance(guidance_scale) {
        return unet.forward(latents, timestep, cond, lora);
    }
    let input = Tensor::cat(&[latents, latents], 0)?;
    let pred = unet.forward(&input, timestep, cond, lora)?;
    let uncond = pred.narrow(0, 0, 1)?;
    let text = pred.narrow(0, 1, 1)?;
    uncond.clone() + ((text - uncond)? * guidance_scale)?
}

/// Whether a guidance scale asks for the unconditional branch.
pub fn uses_guidance(guidance_scale: f64) -> bool {
    guidance_scale > 1.0
}
