//! The down, mid and up blocks of `UNet2DConditionModel`.

use candle_core::Result;
use candle_nn::VarBuilder;

use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::transformer::{Transformer2DModel, TransformerConfig};

/// `CrossAttnDownBlock2D` (with transformers) or `DownBlock2D` (without).
#[derive(Clone, Debug)]
pub struct DownBlock {
    pub(super) resnets: Vec<ResnetBlock2D>,
    pub(super) attentions: Vec<Transformer2DModel>,
    pub(super) downsampler: Option<Downsample2D>,
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
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Clone, Debug)]
pub struct MidBlock {
    pub(super) resnets: Vec<ResnetBlock2D>,
    pub(super) attentions: Vec<Transformer2DModel>,
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
}

/// `CrossAttnUpBlock2D` or `UpBlock2D`: each resnet takes the previous output concatenated
/// with one skip state.
#[derive(Clone, Debug)]
pub struct UpBlock {
    pub(super) resnets: Vec<ResnetBlock2D>,
    pub(super) attentions: Vec<Transformer2DModel>,
    pub(super) upsampler: Option<Upsample2D>,
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
}
