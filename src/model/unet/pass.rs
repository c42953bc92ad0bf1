//! The UNet's forward pass as layers over a stack `[skips…, temb, h]`: the skip connections
//! wait at the bottom of the stack while each resnet, transformer and resampler runs on the
//! timestep embedding and the hidden state on top.

use candle_core::{Result, Tensor};

use super::embeddings::timestep_features;
use super::blocks::{DownBlock, MidBlock, UpBlock};
use super::{Conditioning, UNet2DConditionModel};
use crate::lora::LoraSet;
use crate::model::staged::Staged;

/// One layer of the pass, with the block and position it belongs to.
#[derive(Clone, Copy, Debug)]
pub(super) enum Layer {
    /// Timestep embedding (plus SDXL's added text/time embedding) and `conv_in`: `[sample]` → `[h, temb, h]` (`h` is the first skip).
    In,
    /// `down_blocks.{block}.resnets.{j}`; `push` keeps the output as a skip (when no
    /// transformer follows it).
    DownResnet { block: usize, j: usize, push: bool },
    /// `down_blocks.{block}.attentions.{j}`, keeping its output as a skip.
    DownAttention { block: usize, j: usize },
    /// `down_blocks.{block}.downsamplers.0`, keeping its output as a skip.
    Downsample { block: usize },
    MidResnet { j: usize },
    MidAttention { j: usize },
    /// Pops a skip, concatenates it to `h` and runs `up_blocks.{block}.resnets.{j}`:
    /// `[skip, temb, h]` → `[temb, h]`.
    UpResnet { block: usize, j: usize },
    UpAttention { block: usize, j: usize },
    /// `up_blocks.{block}.upsamplers.0` to the next skip's size: `[skip, temb, h]` in and out.
    Upsample { block: usize },
    /// `conv_norm_out`, SiLU, `conv_out`: `[temb, h]` → `[ε]`.
    Out,
}

impl Layer {
    fn reads(self) -> usize {
        match self {
            Layer::In => 1,
            Layer::UpResnet { .. } | Layer::Upsample { .. } => 3,
            _ => 2,
        }
    }
}

/// The layers of the forward pass in order (fixed by the architecture: the blocks).
pub(super) fn build_layers(down_blocks: &[DownBlock], mid_block: Option<&MidBlock>, up_blocks: &[UpBlock]) -> Vec<Layer> {
    let mut layers = vec![Layer::In];
    let mut skips = 1;
    for (block, b) in down_blocks.iter().enumerate() {
        for j in 0..b.resnets.len() {
            let attention = j < b.attentions.len();
            layers.push(Layer::DownResnet { block, j, push: !attention });
            if attention {
                layers.push(Layer::DownAttention { block, j });
            }
            skips += 1;
        }
        if b.downsampler.is_some() {
            layers.push(Layer::Downsample { block });
            skips += 1;
        }
    }
    if let Some(mid) = mid_block {
        layers.push(Layer::MidResnet { j: 0 });
        for j in 0..mid.attentions.len().min(mid.resnets.len() - 1) {
            layers.push(Layer::MidAttention { j });
            layers.push(Layer::MidResnet { j: j + 1 });
        }
    }
    for (block, b) in up_blocks.iter().enumerate() {
        for j in 0..b.resnets.len() {
            layers.push(Layer::UpResnet { block, j });
            skips -= 1;
            if j < b.attentions.len() {
                layers.push(Layer::UpAttention { block, j });
            }
        }
        // As diffusers: upsample to the size of the skips the next block consumes.
        if b.upsampler.is_some() && skips > 0 {
            layers.push(Layer::Upsample { block });
        }
    }
    layers.push(Layer::Out);
    layers
}

impl UNet2DConditionModel {
    /// The forward pass with one timestep per batch item, as layers (see
    /// [`Self::forward_timesteps`]).
    pub fn pass<'a>(&'a self, timesteps: &'a [f64], cond: &'a Conditioning, lora: &'a LoraSet) -> UNetPass<'a> {
        UNetPass { unet: self, timesteps, cond, lora }
    }
}

/// [`UNet2DConditionModel::forward_timesteps`] as layers.
pub struct UNetPass<'a> {
    unet: &'a UNet2DConditionModel,
    timesteps: &'a [f64],
    cond: &'a Conditioning,
    lora: &'a LoraSet,
}

fn unpack<const N: usize>(top: Vec<Tensor>) -> Result<[Tensor; N]> {
    <[Tensor; N]>::try_from(top).map_err(|t| candle_core::Error::Msg(format!("unet layer: {N} tensors expected, got {}", t.len())))
}

impl UNetPass<'_> {
    fn embed_in(&self, sample: &Tensor) -> Result<Vec<Tensor>> {
        let (unet, c) = (self.unet, &self.unet.config);
        let batch = sample.dim(0)?;
        if self.timesteps.len() != batch || self.cond.batch()? != batch {
            candle_core::bail!("unet: {} timesteps and {} conditionings for a batch of {batch}", self.timesteps.len(), self.cond.batch()?);
        }
        let t = timestep_features(self.timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift, sample.dtype(), sample.device())?;
        let mut temb = unet.time_embedding.forward(&t, self.lora)?;
        match (&unet.add_embedding, &self.cond.added) {
            (Some(e), Some(added)) => temb = (temb + e.forward(added, sample.dtype(), self.lora)?)?,
            (None, None) => {}
            (Some(_), None) => candle_core::bail!("unet: this UNet (addition_embed_type \"text_time\") needs text_embeds and time_ids"),
            (None, Some(_)) => candle_core::bail!("unet: text_embeds and time_ids given to a UNet without addition_embed_type"),
        }
        let h = unet.conv_in.forward(sample, self.lora)?;
        Ok(vec![h.clone(), temb, h])
    }
}

impl Staged for UNetPass<'_> {
    fn layers(&self) -> usize {
        self.unet.layers.len()
    }

    fn reads(&self, i: usize) -> usize {
        self.unet.layers[i].reads()
    }

    fn run(&self, i: usize, top: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let (unet, ctx, lora) = (self.unet, &self.cond.context, self.lora);
        let down = |b: usize| &unet.down_blocks[b];
        let up = |b: usize| &unet.up_blocks[b];
        let mid = || unet.mid_block.as_ref().ok_or_else(|| candle_core::Error::Msg("unet has no mid block".into()));
        Ok(match unet.layers[i] {
            Layer::In => {
                let [sample] = unpack(top)?;
                self.embed_in(&sample)?
            }
            Layer::DownResnet { block, j, push } => {
                let [temb, h] = unpack(top)?;
                let h = down(block).resnets[j].forward(&h, Some(&temb), lora)?;
                if push { vec![h.clone(), temb, h] } else { vec![temb, h] }
            }
            Layer::DownAttention { block, j } => {
                let [temb, h] = unpack(top)?;
                let h = down(block).attentions[j].forward(&h, ctx, lora)?;
                vec![h.clone(), temb, h]
            }
            Layer::Downsample { block } => {
                let [temb, h] = unpack(top)?;
                let d = down(block).downsampler.as_ref().ok_or_else(|| candle_core::Error::Msg("no downsampler".into()))?;
                let h = d.forward(&h, lora)?;
                vec![h.clone(), temb, h]
            }
            Layer::MidResnet { j } => {
                let [temb, h] = unpack(top)?;
                let h = mid()?.resnets[j].forward(&h, Some(&temb), lora)?;
                vec![temb, h]
            }
            Layer::MidAttention { j } => {
                let [temb, h] = unpack(top)?;
                let h = mid()?.attentions[j].forward(&h, ctx, lora)?;
                vec![temb, h]
            }
            Layer::UpResnet { block, j } => {
                let [skip, temb, h] = unpack(top)?;
                let h = up(block).resnets[j].forward(&Tensor::cat(&[&h, &skip], 1)?, Some(&temb), lora)?;
                vec![temb, h]
            }
            Layer::UpAttention { block, j } => {
                let [temb, h] = unpack(top)?;
                let h = up(block).attentions[j].forward(&h, ctx, lora)?;
                vec![temb, h]
            }
            Layer::Upsample { block } => {
                let [skip, temb, h] = unpack(top)?;
                let u = up(block).upsampler.as_ref().ok_or_else(|| candle_core::Error::Msg("no upsampler".into()))?;
                let (_, _, sh, sw) = skip.dims4()?;
                let h = u.forward(&h, (sh, sw), lora)?;
                vec![skip, temb, h]
            }
            Layer::Out => {
                let [_temb, h] = unpack(top)?;
                let h = unet.conv_norm_out.forward_silu(&h)?;
                vec![unet.conv_out.forward(&h, lora)?]
            }
        })
    }
}
