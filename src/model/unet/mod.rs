//! diffusers `UNet2DConditionModel` (the SD 1.x / 2.x layout), LoRA-aware and differentiable.

mod blocks;
mod embeddings;
mod resnet;
mod transformer;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use self::blocks::{BlockConfig, DownBlock, MidBlock, UpBlock};
use self::embeddings::{timestep_features, TimestepEmbedding};
use self::resnet::ResnetConfig;
use self::transformer::TransformerConfig;
use crate::lora::LoraSet;
use crate::model::config::UNetConfig;
use crate::model::nn::{Conv2d, GroupNorm};

/// The noise-prediction UNet: `forward(latents, t, text_embeddings) → ε` (or v).
#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let c = config;
        let n = c.block_out_channels.len();
        let boc = &c.block_out_channels;
        let heads = c.heads()?;
        let layers = c.layers_per_block.expand(n, "layers_per_block")?;
        let t_layers = c.transformer_layers_per_block.expand(n, "transformer_layers_per_block")?;
        let only_cross = c.only_cross();
        let time_dim = boc[0] * 4;
        let resnet = ResnetConfig {
            in_channels: 0,
            out_channels: 0,
            temb_channels: Some(time_dim),
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            output_scale_factor: 1.0,
        };
        let transformer = |i: usize| TransformerConfig {
            heads: heads[i],
            layers: t_layers[i],
            cross_attention_dim: c.cross_attention_dim,
            groups: c.norm_num_groups,
            use_linear_projection: c.use_linear_projection,
            only_cross_attention: only_cross.get(i).copied().unwrap_or(false),
            upcast: c.upcast_attention,
        };

        let conv_pad = (c.conv_in_kernel - 1) / 2;
        let conv_in = Conv2d::new(vb.pp("conv_in"), c.in_channels, boc[0], c.conv_in_kernel, 1, conv_pad, true)?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), boc[0], time_dim)?;

        // Skip-state widths pushed by the down path, consumed last-first by the up path.
        let mut skip_widths = vec![boc[0]];
        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let in_c = if i == 0 { boc[0] } else { boc[i - 1] };
            let cross = c.down_block_types[i] == "CrossAttnDownBlock2D";
            let cfg = BlockConfig {
                in_channels: in_c,
                out_channels: boc[i],
                layers: layers[i],
                resnet,
                transformer: cross.then(|| transformer(i)),
            };
            let pad = (i + 1 < n).then_some(c.downsample_padding);
            down_blocks.push(DownBlock::new(vb.pp(format!("down_blocks.{i}")), &cfg, pad)?);
            skip_widths.extend(std::iter::repeat_n(boc[i], layers[i] + usize::from(i + 1 < n)));
        }

        let mid_block = match c.mid_block_type {
            Some(_) => {
                let rc = ResnetConfig { output_scale_factor: c.mid_block_scale_factor, ..resnet };
                let mut tc = transformer(n - 1);
                tc.only_cross_attention = false;
                Some(MidBlock::new(vb.pp("mid_block"), boc[n - 1], rc, &tc)?)
            }
            None => None,
        };

        let mut up_blocks = Vec::with_capacity(n);
        let mut prev = boc[n - 1];
        for i in 0..n {
            let r = n - 1 - i; // the matching down level
            let num = layers[r] + 1;
            let skips: Vec<usize> = (0..num).map(|_| skip_widths.pop().unwrap_or(0)).collect();
            let cross = c.up_block_types[i] == "CrossAttnUpBlock2D";
            let cfg = BlockConfig {
                in_channels: prev,
                out_channels: boc[r],
                layers: num,
                resnet,
                transformer: cross.then(|| transformer(r)),
            };
            up_blocks.push(UpBlock::new(vb.pp(format!("up_blocks.{i}")), &cfg, prev, &skips, i + 1 < n)?);
            prev = boc[r];
        }

        let out_pad = (c.conv_out_kernel - 1) / 2;
        Ok(Self {
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), c.norm_num_groups, boc[0], c.norm_eps)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), boc[0], c.out_channels, c.conv_out_kernel, 1, out_pad, true)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// `sample`: `[B, C, h, w]` latents; `timestep`: the diffusion timestep shared by the
    /// batch; `context`: `[B, T, cross_attention_dim]` text embeddings.
    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        self.forward_timesteps(sample, &vec![timestep; sample.dim(0)?], context, lora)
    }

    /// [`Self::forward`] with one timestep per batch item (training).
    pub fn forward_timesteps(&self, sample: &Tensor, timesteps: &[f64], context: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        if timesteps.len() != sample.dim(0)? {
            candle_core::bail!("unet: {} timesteps for a batch of {}", timesteps.len(), sample.dim(0)?);
        }
        let c = &self.config;
        let t = timestep_features(
            timesteps,
            c.block_out_channels[0],
            c.flip_sin_to_cos,
            c.freq_shift,
            sample.dtype(),
            sample.device(),
        )?;
        let temb = self.time_embedding.forward(&t, lora)?;

        let mut h = self.conv_in.forward(sample, lora)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            let (out, states) = block.forward(&h, &temb, context, lora)?;
            h = out;
            skips.extend(states);
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &temb, context, lora)?;
        }
        for block in &self.up_blocks {
            let remaining = skips.len().saturating_sub(block.num_skips());
            let size = match remaining {
                0 => None,
                _ => {
                    let (_, _, sh, sw) = skips[remaining - 1].dims4()?;
                    Some((sh, sw))
                }
            };
            h = block.forward(&h, &mut skips, &temb, context, size, lora)?;
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h, lora)
    }
}
