//! diffusers `AutoencoderKL` (the SD 1.x / 2.x VAE): same module paths and numerics, built
//! only from differentiable ops so gradients can flow through the decoder.

use anyhow::bail;
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::lora::LoraSet;
use crate::model::config::VaeConfig;
use crate::model::nn::{attention, linear, Conv2d, GroupNorm};
use crate::model::staged::{run_to_one, Staged};

/// GroupNorm epsilon of every VAE block (diffusers hard-codes 1e-6).
const EPS: f64 = 1e-6;

fn conv(vb: VarBuilder, in_c: usize, out_c: usize, kernel: usize, stride: usize) -> Result<Conv2d> {
    Conv2d::new(vb, in_c, out_c, kernel, stride, kernel / 2, true)
}

/// diffusers `ResnetBlock2D` without a time embedding.
#[derive(Clone, Debug)]
struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    fn new(vb: VarBuilder, in_c: usize, out_c: usize, groups: usize) -> Result<Self> {
        let conv_shortcut = if in_c != out_c {
            Some(conv(vb.pp("conv_shortcut"), in_c, out_c, 1, 1)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), groups, in_c, EPS)?,
            conv1: conv(vb.pp("conv1"), in_c, out_c, 3, 1)?,
            norm2: GroupNorm::new(vb.pp("norm2"), groups, out_c, EPS)?,
            conv2: conv(vb.pp("conv2"), out_c, out_c, 3, 1)?,
            conv_shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let lora = LoraSet::none();
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?, lora)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?, lora)?;
        match &self.conv_shortcut {
            Some(c) => c.forward(x, lora)? + h,
            None => x + h,
        }
    }
}

/// A bias-carrying projection of the mid-block attention; legacy files may store it as a
/// 1×1 convolution kernel `[C, C, 1, 1]`.
fn projection(vb: VarBuilder, channels: usize, legacy: bool) -> Result<candle_nn::Linear> {
    let weight = if legacy && vb.get_unchecked("weight")?.rank() == 4 {
        vb.get((channels, channels, 1, 1), "weight")?.reshape((channels, channels))?
    } else {
        vb.get((channels, channels), "weight")?
    };
    Ok(candle_nn::Linear::new(weight, Some(vb.get(channels, "bias")?)))
}

/// Single-head self-attention over the pixels with a GroupNorm in front and a residual
/// (diffusers `Attention` as built by `UNetMidBlock2D`). Reads both the current
/// (`to_q`/`to_k`/`to_v`/`to_out.0`) and the legacy (`query`/`key`/`value`/`proj_attn`) names.
#[derive(Clone, Debug)]
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: candle_nn::Linear,
    to_k: candle_nn::Linear,
    to_v: candle_nn::Linear,
    to_out: candle_nn::Linear,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        let legacy = !vb.contains_tensor("to_q.weight");
        let names = if legacy {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        let [q, k, v, out] = names.map(|n| projection(vb.pp(n), channels, legacy));
        Ok(Self {
            group_norm: GroupNorm::new(vb.pp("group_norm"), groups, channels, EPS)?,
            to_q: q?,
            to_k: k?,
            to_v: v?,
            to_out: out?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hs = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?;
        let heads = |l: &candle_nn::Linear| linear(&hs, l)?.unsqueeze(1);
        let y =
            attention(&heads(&self.to_q)?, &heads(&self.to_k)?, &heads(&self.to_v)?, None, true)?;
        let y = linear(&y.squeeze(1)?, &self.to_out)?;
        x + y.transpose(1, 2)?.reshape((b, c, h, w))?
    }
}

/// diffusers `UNetMidBlock2D` without time embedding: resnet, optional attention, resnet.
#[derive(Clone, Debug)]
struct MidBlock {
    resnet_0: ResnetBlock2D,
    attention: Option<AttentionBlock>,
    resnet_1: ResnetBlock2D,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize, add_attention: bool) -> Result<Self> {
        let attention = if add_attention {
            Some(AttentionBlock::new(vb.pp("attentions.0"), channels, groups)?)
        } else {
            None
        };
        Ok(Self {
            resnet_0: ResnetBlock2D::new(vb.pp("resnets.0"), channels, channels, groups)?,
            attention,
            resnet_1: ResnetBlock2D::new(vb.pp("resnets.1"), channels, channels, groups)?,
        })
    }

    /// Resnet, attention (when present), resnet.
    fn num_layers(&self) -> usize {
        2 + usize::from(self.attention.is_some())
    }

    fn layer(&self, j: usize, x: &Tensor) -> Result<Tensor> {
        match (j, &self.attention) {
            (0, _) => self.resnet_0.forward(x),
            (1, Some(attn)) => attn.forward(x),
            _ => self.resnet_1.forward(x),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        (0..self.num_layers()).try_fold(x.clone(), |h, j| self.layer(j, &h))
    }
}

/// The resampling convolution closing an encoder or decoder block.
#[derive(Clone, Copy, Debug)]
enum Resample {
    /// `downsamplers.0.conv`, 3×3 stride 2 without padding.
    Down,
    /// `upsamplers.0.conv`, 3×3 stride 1 after nearest 2× upsampling.
    Up,
}

/// Resnets of one encoder (`DownEncoderBlock2D`) or decoder (`UpDecoderBlock2D`) block, then
/// an optional resampling convolution.
#[derive(Clone, Debug)]
struct ResampleBlock {
    resnets: Vec<ResnetBlock2D>,
    resample: Option<(Resample, Conv2d)>,
}

impl ResampleBlock {
    fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        layers: usize,
        groups: usize,
        resample: Option<Resample>,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|j| {
                let i = if j == 0 { in_c } else { out_c };
                ResnetBlock2D::new(vb.pp(format!("resnets.{j}")), i, out_c, groups)
            })
            .collect::<Result<Vec<_>>>()?;
        let resample = match resample {
            Some(r @ Resample::Down) => {
                Some((r, Conv2d::new(vb.pp("downsamplers.0.conv"), out_c, out_c, 3, 2, 0, true)?))
            }
            Some(r @ Resample::Up) => {
                Some((r, conv(vb.pp("upsamplers.0.conv"), out_c, out_c, 3, 1)?))
            }
            None => None,
        };
        Ok(Self { resnets, resample })
    }

    /// Each resnet, then the resampling convolution.
    fn num_layers(&self) -> usize {
        self.resnets.len() + usize::from(self.resample.is_some())
    }

    fn layer(&self, j: usize, h: &Tensor) -> Result<Tensor> {
        if let Some(r) = self.resnets.get(j) {
            return r.forward(h);
        }
        match &self.resample {
            // diffusers `Downsample2D(padding=0)`: zero-pad right and bottom first.
            Some((Resample::Down, c)) => {
                c.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?, LoraSet::none())
            }
            Some((Resample::Up, c)) => {
                let (_, _, hh, ww) = h.dims4()?;
                c.forward(&h.upsample_nearest2d(2 * hh, 2 * ww)?, LoraSet::none())
            }
            None => Ok(h.clone()),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        (0..self.num_layers()).try_fold(x.clone(), |h, j| self.layer(j, &h))
    }
}

/// The final GroupNorm, SiLU and 3×3 convolution of the encoder and decoder.
#[derive(Clone, Debug)]
struct OutHead {
    norm: GroupNorm,
    conv: Conv2d,
}

impl OutHead {
    fn new(vb: &VarBuilder, in_c: usize, out_c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(vb.pp("conv_norm_out"), groups, in_c, EPS)?,
            conv: conv(vb.pp("conv_out"), in_c, out_c, 3, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&self.norm.forward_silu(x)?, LoraSet::none())
    }
}

/// diffusers VAE `Encoder` (with `double_z`): image → latent mean and log-variance.
#[derive(Clone, Debug)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<ResampleBlock>,
    mid_block: MidBlock,
    out: OutHead,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let down_blocks = (0..ch.len())
            .map(|i| {
                let in_c = ch[i.saturating_sub(1)];
                let down = (i + 1 < ch.len()).then_some(Resample::Down);
                let vb = vb.pp(format!("down_blocks.{i}"));
                ResampleBlock::new(vb, in_c, ch[i], cfg.layers_per_block, groups, down)
            })
            .collect::<Result<Vec<_>>>()?;
        let last = ch[ch.len() - 1];
        Ok(Self {
            conv_in: conv(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1)?,
            down_blocks,
            mid_block: MidBlock::new(
                vb.pp("mid_block"),
                last,
                groups,
                cfg.mid_block_add_attention,
            )?,
            out: OutHead::new(&vb, last, 2 * cfg.latent_channels, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x, LoraSet::none())?;
        for block in &self.down_blocks {
            h = block.forward(&h)?;
        }
        self.out.forward(&self.mid_block.forward(&h)?)
    }
}

/// diffusers VAE `Decoder`: latent → image.
#[derive(Clone, Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<ResampleBlock>,
    out: OutHead,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let groups = cfg.norm_num_groups;
        let up_blocks = (0..rev.len())
            .map(|i| {
                let in_c = rev[i.saturating_sub(1)];
                let up = (i + 1 < rev.len()).then_some(Resample::Up);
                let vb = vb.pp(format!("up_blocks.{i}"));
                ResampleBlock::new(vb, in_c, rev[i], cfg.layers_per_block + 1, groups, up)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_in: conv(vb.pp("conv_in"), cfg.latent_channels, rev[0], 3, 1)?,
            mid_block: MidBlock::new(
                vb.pp("mid_block"),
                rev[0],
                groups,
                cfg.mid_block_add_attention,
            )?,
            up_blocks,
            out: OutHead::new(&vb, rev[rev.len() - 1], cfg.out_channels, groups)?,
        })
    }

    /// `conv_in`, the mid block's layers, each up block's layers, the output head.
    fn num_layers(&self) -> usize {
        2 + self.mid_block.num_layers() + self.up_blocks.iter().map(ResampleBlock::num_layers).sum::<usize>()
    }

    fn layer(&self, i: usize, h: &Tensor) -> Result<Tensor> {
        if i == 0 {
            return self.conv_in.forward(h, LoraSet::none());
        }
        let mut j = i - 1;
        if j < self.mid_block.num_layers() {
            return self.mid_block.layer(j, h);
        }
        j -= self.mid_block.num_layers();
        for block in &self.up_blocks {
            if j < block.num_layers() {
                return block.layer(j, h);
            }
            j -= block.num_layers();
        }
        match j {
            0 => self.out.forward(h),
            _ => candle_core::bail!("vae decoder has no layer {i}"),
        }
    }
}

/// The encoder's diagonal Gaussian over latents (diffusers `DiagonalGaussianDistribution`).
#[derive(Clone, Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Log-variance, clamped to `[-30, 20]`.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// `mean + exp(logvar / 2) · noise`, with `noise` standard normal of the latent shape.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (self.logvar.affine(0.5, 0.0)?.exp()? * noise)?
    }
}

/// diffusers `AutoencoderKL`. Latents are unscaled: the caller multiplies encoder samples by
/// `scaling_factor` and divides latents by it before [`AutoencoderKL::decode`].
#[derive(Clone, Debug)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
    /// The weights' dtype, which the decoder computes in.
    dtype: DType,
}

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        if let Some(t) = cfg.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
            bail!("vae config: unsupported down block type {t:?}");
        }
        if let Some(t) = cfg.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            bail!("vae config: unsupported up block type {t:?}");
        }
        let (l, l2) = (cfg.latent_channels, 2 * cfg.latent_channels);
        let quant_conv =
            if cfg.use_quant_conv { Some(conv(vb.pp("quant_conv"), l2, l2, 1, 1)?) } else { None };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv(vb.pp("post_quant_conv"), l, l, 1, 1)?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv,
            post_quant_conv,
            config: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Encodes images `[B, in_channels, H, W]` in `[-1, 1]` into the latent distribution.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let mut moments = self.encoder.forward(x)?;
        if let Some(c) = &self.quant_conv {
            moments = c.forward(&moments, LoraSet::none())?;
        }
        let l = self.config.latent_channels;
        Ok(DiagonalGaussian {
            mean: moments.narrow(1, 0, l)?,
            logvar: moments.narrow(1, l, l)?.clamp(-30f64, 20f64)?,
        })
    }

    /// Decodes latents `[B, latent_channels, h, w]` (already divided by `scaling_factor`)
    /// into images `[B, out_channels, h·s, w·s]` in about `[-1, 1]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        run_to_one(&Decode { vae: self, scaled: false }, z.clone())
    }

    /// [`Self::decode`] of latents as the sampler produces them (multiplied by
    /// `scaling_factor`, after subtracting `shift_factor`).
    pub fn decode_scaled(&self, latents: &Tensor) -> Result<Tensor> {
        run_to_one(&self.scaled_decoder(), latents.clone())
    }

    /// Encoder samples → latents as the sampler uses them: minus `shift_factor` where the
    /// config has one, times `scaling_factor` (the inverse of [`Self::unscale`]).
    pub fn scale(&self, z: &Tensor) -> Result<Tensor> {
        let z = match self.config.shift_factor {
            Some(s) => (z - s)?,
            None => z.clone(),
        };
        z * self.config.scaling_factor
    }

    /// Latents as the sampler produces them → the decoder's input: in the VAE's dtype,
    /// divided by `scaling_factor`, plus `shift_factor` where the config has one.
    pub fn unscale(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents.to_dtype(self.dtype)? / self.config.scaling_factor)?;
        match self.config.shift_factor {
            Some(s) => z + s,
            None => Ok(z),
        }
    }

    /// [`Self::decode_scaled`] as layers, for layer-by-layer recomputation.
    pub fn scaled_decoder(&self) -> Decode<'_> {
        Decode { vae: self, scaled: true }
    }
}

/// The decoder pass: the latent unscaling (for [`AutoencoderKL::decode_scaled`]),
/// `post_quant_conv` and `conv_in` as the first layer, then the decoder's layers.
pub struct Decode<'a> {
    vae: &'a AutoencoderKL,
    scaled: bool,
}

impl Decode<'_> {
    fn first(&self, latents: &Tensor) -> Result<Tensor> {
        let z = if self.scaled { self.vae.unscale(latents)? } else { latents.clone() };
        match &self.vae.post_quant_conv {
            Some(c) => self.vae.decoder.layer(0, &c.forward(&z, LoraSet::none())?),
            None => self.vae.decoder.layer(0, &z),
        }
    }
}

impl Staged for Decode<'_> {
    fn layers(&self) -> usize {
        self.vae.decoder.num_layers()
    }

    fn reads(&self, _: usize) -> usize {
        1
    }

    fn run(&self, i: usize, top: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let [h] = <[Tensor; 1]>::try_from(top).map_err(|_| candle_core::Error::Msg("vae decoder: one tensor expected".into()))?;
        Ok(vec![if i == 0 { self.first(&h)? } else { self.vae.decoder.layer(i, &h)? }])
    }
}
