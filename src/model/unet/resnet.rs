//! `ResnetBlock2D`, `Downsample2D` and `Upsample2D` of the diffusers UNet.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::lora::LoraSet;
use crate::model::nn::{Conv2d, GroupNorm, Linear};

/// Two GroupNorm-SiLU-conv stages with the time embedding added in between, plus a residual.
#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// Shapes and norms of one [`ResnetBlock2D`].
#[derive(Clone, Copy, Debug)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cfg: ResnetConfig) -> Result<Self> {
        let (i, o) = (cfg.in_channels, cfg.out_channels);
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(Linear::new(vb.pp("time_emb_proj"), t, o, true)?),
            None => None,
        };
        let conv_shortcut = if i != o {
            Some(Conv2d::new(vb.pp("conv_shortcut"), i, o, 1, 1, 0, true)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), cfg.groups, i, cfg.eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), i, o, 3, 1, 1, true)?,
            time_emb_proj,
            norm2: GroupNorm::new(vb.pp("norm2"), cfg.groups, o, cfg.eps)?,
            conv2: Conv2d::new(vb.pp("conv2"), o, o, 3, 1, 1, true)?,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>, lora: &LoraSet) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?, lora)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()?, lora)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?, lora)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x, lora)?,
            None => x.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// Strided 3×3 convolution halving the spatial size.
#[derive(Clone, Debug)]
pub struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self { conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, 2, padding, true)? })
    }

    pub fn forward(&self, x: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        self.conv.forward(x, lora)
    }
}

/// Nearest-neighbour upsampling to `size` followed by a 3×3 convolution.
#[derive(Clone, Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self { conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, 1, 1, true)? })
    }

    pub fn forward(&self, x: &Tensor, size: (usize, usize), lora: &LoraSet) -> Result<Tensor> {
        self.conv.forward(&x.upsample_nearest2d(size.0, size.1)?, lora)
    }
}
