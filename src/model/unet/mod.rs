//! diffusers `UNet2DConditionModel` (the SD 1.x / 2.x and SDXL layouts), LoRA-aware and
//! differentiable.

mod blocks;
mod conditioning;
mod embeddings;
mod pass;
mod resnet;
mod transformer;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use self::blocks::{BlockConfig, DownBlock, MidBlock, UpBlock};
pub use self::conditioning::{AddedConditions, Conditioning};
use self::embeddings::{TextTimeEmbedding, TimestepEmbedding};
use self::pass::Layer;
pub use self::pass::UNetPass;
use self::resnet::ResnetConfig;
use self::transformer::TransformerConfig;
use crate::lora::LoraSet;
use crate::model::config::UNetConfig;
use crate::model::nn::{Conv2d, GroupNorm};
use crate::model::staged::run_to_one;

/// The noise-prediction UNet: `forward(latents, t, conditioning) → ε` (or v).
#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    /// SDXL's `add_embedding` (`addition_embed_type: "text_time"`).
    add_embedding: Option<TextTimeEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
    /// The forward pass's layers (see [`UNetPass`]).
    layers: Vec<Layer>,
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
        let add_embedding = match (c.addition_time_embed_dim, c.projection_class_embeddings_input_dim) {
            (Some(dim), Some(input)) if c.addition_embed_type.is_some() => {
                Some(TextTimeEmbedding::new(vb.clone(), dim, input, time_dim, c.flip_sin_to_cos, c.freq_shift)?)
            }
            _ => None,
        };

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
        let layers = pass::build_layers(&down_blocks, mid_block.as_ref(), &up_blocks);
        Ok(Self {
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), c.norm_num_groups, boc[0], c.norm_eps)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), boc[0], c.out_channels, c.conv_out_kernel, 1, out_pad, true)?,
            config: config.clone(),
            layers,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Whether the UNet takes SDXL's added conditions (pooled text embedding and time ids).
    pub fn takes_added_conditions(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// `sample`: `[B, C, h, w]` latents; `timestep`: the diffusion timestep shared by the
    /// batch; `cond`: the text conditioning of each batch item.
    pub fn forward(&self, sample: &Tensor, timestep: f64, cond: &Conditioning, lora: &LoraSet) -> Result<Tensor> {
        self.forward_timesteps(sample, &vec![timestep; sample.dim(0)?], cond, lora)
    }

    /// [`Self::forward`] with one timestep per batch item (training).
    pub fn forward_timesteps(&self, sample: &Tensor, timesteps: &[f64], cond: &Conditioning, lora: &LoraSet) -> Result<Tensor> {
        run_to_one(&self.pass(timesteps, cond, lora), sample.clone())
    }
}
