//! The down, mid and up blocks of `UNet2DConditionModel`.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::transformer::{Transformer2DModel, TransformerConfig};
use crate::lora::LoraSet;

/// `CrossAttnDownBlock2D` (with transformers) or `DownBlock2D` (without).
#[derive(Clone, Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

/// Settings of one down or up block.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub layers: usize,
    pub resnet: ResnetConfig,
    /// `Some` for the cross-attention variants.
    pub transformer: Option<TransformerConfig>,
}

impl DownBlock {
    pub fn new(vb: VarBuilder, cfg: &BlockConfig, downsample_padding: Option<usize>) -> Result<Self> {
        let mut resnets = Vec::with_capacity(cfg.layers);
        let mut attentions = Vec::new();
        for j in 0..cfg.layers {
            let in_c = if j == 0 { cfg.in_channels } else { cfg.out_channels };
            let rc = ResnetConfig { in_channels: in_c, out_channels: cfg.out_channels, ..cfg.resnet };
            resnets.push(ResnetBlock2D::new(vb.pp(format!("resnets.{j}")), rc)?);
            if let Some(tc) = &cfg.transformer {
                let vb = vb.pp(format!("attentions.{j}"));
                attentions.push(Transformer2DModel::new(vb, cfg.out_channels, tc)?);
            }
        }
        let downsampler = match downsample_padding {
            Some(p) => Some(Downsample2D::new(vb.pp("downsamplers.0"), cfg.out_channels, p)?),
            None => None,
        };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Returns the block output and the states it hands to the up path as skips.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        lora: &LoraSet,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb), lora)?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, context, lora)?;
            }
            skips.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h, lora)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Clone, Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn new(vb: VarBuilder, channels: usize, resnet: ResnetConfig, tc: &TransformerConfig) -> Result<Self> {
        let rc = ResnetConfig { in_channels: channels, out_channels: channels, ..resnet };
        Ok(Self {
            resnets: vec![
                ResnetBlock2D::new(vb.pp("resnets.0"), rc)?,
                ResnetBlock2D::new(vb.pp("resnets.1"), rc)?,
            ],
            attentions: vec![Transformer2DModel::new(vb.pp("attentions.0"), channels, tc)?],
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, Some(temb), lora)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, context, lora)?;
            h = resnet.forward(&h, Some(temb), lora)?;
        }
        Ok(h)
    }
}

/// `CrossAttnUpBlock2D` or `UpBlock2D`: each resnet takes the previous output concatenated
/// with one skip state.
#[derive(Clone, Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `prev_channels` is the output width of the block below; `skip_channels` the widths of
    /// the skip states it consumes, in consumption order.
    pub fn new(
        vb: VarBuilder,
        cfg: &BlockConfig,
        prev_channels: usize,
        skip_channels: &[usize],
        add_upsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(cfg.layers);
        let mut attentions = Vec::new();
        for (j, skip) in skip_channels.iter().enumerate() {
            let in_c = if j == 0 { prev_channels } else { cfg.out_channels };
            let rc = ResnetConfig { in_channels: in_c + skip, out_channels: cfg.out_channels, ..cfg.resnet };
            resnets.push(ResnetBlock2D::new(vb.pp(format!("resnets.{j}")), rc)?);
            if let Some(tc) = &cfg.transformer {
                let vb = vb.pp(format!("attentions.{j}"));
                attentions.push(Transformer2DModel::new(vb, cfg.out_channels, tc)?);
            }
        }
        let upsampler = if add_upsample {
            Some(Upsample2D::new(vb.pp("upsamplers.0"), cfg.out_channels)?)
        } else {
            None
        };
        Ok(Self { resnets, attentions, upsampler })
    }

    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are consumed last-first; `upsample_size` is the spatial size of the next
    /// level's skips.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
        lora: &LoraSet,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| candle_core::Error::Msg("unet: missing skip state".into()))?;
            h = Tensor::cat(&[&h, &skip], 1)?;
            h = resnet.forward(&h, Some(temb), lora)?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, context, lora)?;
            }
        }
        if let (Some(up), Some(size)) = (&self.upsampler, upsample_size) {
            h = up.forward(&h, size, lora)?;
        }
        Ok(h)
    }
}
