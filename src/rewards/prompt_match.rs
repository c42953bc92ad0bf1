//! Colour prompt match, analytic: every pixel is softly assigned (softmax over −distance²/τ)
//! to the dataset palette, two neutrals (black, grey) or the image's background colour (the
//! mean of its border); the reward is the share of the foreground (non-background) mass in
//! colours the prompt names minus the share in palette colours it does not name, in [−1, 1].

use candle_core::{Device, Result, Tensor};

use super::Reward;
use crate::dataset::Color;

/// Softmax temperature, in squared RGB distance (channels in [0, 1]).
const TAU: f64 = 0.02;
/// Reference colours that are foreground but neither named nor unnamed.
const NEUTRALS: [[f64; 3]; 2] = [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]];

/// The palette colours a prompt names (any word equal to a colour name).
pub fn named_colors(prompt: &str) -> Result<Vec<Color>> {
    let lower = prompt.to_lowercase();
    let mut colors: Vec<Color> = lower.split(|c: char| !c.is_alphanumeric()).filter_map(Color::parse).collect();
    colors.sort();
    colors.dedup();
    if colors.is_empty() {
        let names: Vec<&str> = Color::ALL.iter().map(|c| c.as_str()).collect();
        candle_core::bail!("prompt_match: prompt {prompt:?} names no colour (known: {})", names.join(", "));
    }
    Ok(colors)
}

/// `[B, 3]` mean colour of each image's one-pixel border.
fn border_mean(images: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = images.dims4()?;
    let edges = [images.narrow(2, 0, 1)?, images.narrow(2, h - 1, 1)?, images.narrow(3, 0, 1)?, images.narrow(3, w - 1, 1)?];
    let flat = edges.iter().map(|e| e.flatten_from(2)).collect::<Result<Vec<_>>>()?;
    Tensor::cat(&flat, 2)?.mean(2)
}

/// `[B, 4]` foreground mass of each palette colour ([`Color::ALL`] order) divided by the
/// image's total foreground mass (plus one pixel, so a blank image scores 0).
pub fn palette_shares(images: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    if c != 3 || h < 3 || w < 3 {
        candle_core::bail!("prompt_match expects [B, 3, H, W] images of at least 3x3, got {:?}", images.dims());
    }
    let (dtype, dev) = (images.dtype(), images.device());
    let fixed: Vec<f64> = Color::ALL.iter().flat_map(|c| c.rgb().map(|v| v as f64 / 255.0)).chain(NEUTRALS.into_iter().flatten()).collect();
    let n_fixed = fixed.len() / 3;
    let fixed = Tensor::from_vec(fixed, (1, n_fixed, 3), &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)?;
    let background = border_mean(images)?.unsqueeze(1)?;
    let refs = Tensor::cat(&[&fixed.broadcast_as((b, n_fixed, 3))?, &background], 1)?.unsqueeze(3)?;
    let pixels = images.reshape((b, 1, 3, h * w))?;
    let d2 = pixels.broadcast_sub(&refs)?.sqr()?.sum(2)?;
    let weights = candle_nn::ops::softmax(&(d2 / -TAU)?, 1)?;
    let mass = weights.sum(2)?;
    let foreground = (mass.narrow(1, 0, n_fixed)?.sum_keepdim(1)? + 1.0)?;
    mass.narrow(1, 0, Color::ALL.len())?.broadcast_div(&foreground)
}

/// Rewards images whose foreground is in the colours the prompt names.
pub struct PromptMatch;

impl Reward for PromptMatch {
    fn name(&self) -> &str {
        "prompt_match"
    }

    fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor> {
        let b = images.dim(0)?;
        if prompts.len() != b {
            candle_core::bail!("prompt_match: {} prompts for {b} images", prompts.len());
        }
        let mut signs = Vec::with_capacity(b * Color::ALL.len());
        for prompt in prompts {
            let named = named_colors(prompt)?;
            signs.extend(Color::ALL.iter().map(|c| if named.contains(c) { 1.0 } else { -1.0 }));
        }
        let signs = Tensor::from_vec(signs, (b, Color::ALL.len()), &Device::Cpu)?.to_dtype(images.dtype())?.to_device(images.device())?;
        (palette_shares(images)? * signs)?.sum(1)
    }
}
