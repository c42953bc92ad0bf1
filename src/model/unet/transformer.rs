//! `Transformer2DModel` with `BasicTransformerBlock`s: self-attention, cross-attention to the
//! text embeddings and a GEGLU feed-forward, as in diffusers.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::lora::LoraSet;
use crate::model::nn::{attention, geglu, Conv2d, GroupNorm, LayerNorm, Linear};

/// diffusers `Attention` without norms: `to_q`, `to_k`, `to_v` (no bias) and `to_out.0`.
#[derive(Clone, Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    upcast: bool,
}

impl Attention {
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::new(vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::new(vb.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::new(vb.pp("to_v"), context_dim, inner, false)?,
            to_out: Linear::new(vb.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            upcast,
        })
    }

    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, c) = x.dims3()?;
        x.reshape((b, s, self.heads, c / self.heads))?.transpose(1, 2)
    }

    /// `x`: `[B, S, C]`; `context`: `[B, T, C']` or `None` for self-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>, lora: &LoraSet) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.split_heads(&self.to_q.forward(x, lora)?)?;
        let k = self.split_heads(&self.to_k.forward(ctx, lora)?)?;
        let v = self.split_heads(&self.to_v.forward(ctx, lora)?)?;
        let out = attention(&q, &k, &v, None, self.upcast)?;
        let (b, h, s, d) = out.dims4()?;
        let out = out.transpose(1, 2)?.reshape((b, s, h * d))?;
        self.to_out.forward(&out, lora)
    }
}

/// `FeedForward` with the GEGLU activation: `net.0.proj` (to 2×inner), gate, `net.2`.
#[derive(Clone, Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: Linear::new(vb.pp("net.0.proj"), dim, inner * 2, true)?,
            out: Linear::new(vb.pp("net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        self.out.forward(&geglu(&self.proj.forward(x, lora)?)?, lora)
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed with a residual.
#[derive(Clone, Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    fn new(vb: VarBuilder, dim: usize, cfg: &TransformerConfig) -> Result<Self> {
        let head_dim = dim / cfg.heads;
        let attn1_ctx = if cfg.only_cross_attention { cfg.cross_attention_dim } else { dim };
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), dim, attn1_ctx, cfg.heads, head_dim, cfg.upcast)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                cfg.cross_attention_dim,
                cfg.heads,
                head_dim,
                cfg.upcast,
            )?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            only_cross_attention: cfg.only_cross_attention,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        let ctx1 = self.only_cross_attention.then_some(context);
        let x = (self.attn1.forward(&self.norm1.forward(x)?, ctx1, lora)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context), lora)? + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?, lora)? + x
    }
}

/// Settings shared by the transformer blocks of one UNet block.
#[derive(Clone, Copy, Debug)]
pub struct TransformerConfig {
    pub heads: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    pub upcast: bool,
}

/// The in/out projection: a 1×1 convolution, or a linear layer on the flattened tokens.
#[derive(Clone, Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(vb: VarBuilder, in_c: usize, out_c: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(Linear::new(vb, in_c, out_c, true)?)
        } else {
            Projection::Conv(Conv2d::new(vb, in_c, out_c, 1, 1, 0, true)?)
        })
    }
}

/// GroupNorm, `proj_in`, the transformer blocks over `H·W` tokens, `proj_out`, residual.
#[derive(Clone, Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, channels: usize, cfg: &TransformerConfig) -> Result<Self> {
        let linear = cfg.use_linear_projection;
        let blocks = (0..cfg.layers)
            .map(|i| BasicTransformerBlock::new(vb.pp(format!("transformer_blocks.{i}")), channels, cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), cfg.groups, channels, 1e-6)?,
            proj_in: Projection::new(vb.pp("proj_in"), channels, channels, linear)?,
            blocks,
            proj_out: Projection::new(vb.pp("proj_out"), channels, channels, linear)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let to_map = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2));
        let normed = self.norm.forward(x)?;
        let mut tokens = match &self.proj_in {
            Projection::Conv(p) => to_tokens(&p.forward(&normed, lora)?)?,
            Projection::Linear(p) => p.forward(&to_tokens(&normed)?, lora)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context, lora)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(p) => p.forward(&to_map(&tokens)?.contiguous()?, lora)?,
            Projection::Linear(p) => to_map(&p.forward(&tokens, lora)?)?,
        };
        out + x
    }
}
