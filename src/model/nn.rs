//! Differentiable building blocks shared by the UNet, VAE and CLIP models.
//!
//! Every layer here has a backward pass: when the input is part of an autograd graph the
//! composed (slow) softmax / layer-norm is used, otherwise candle's fused kernels.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::lora::{apply_deltas, Layer, LoraSet};

/// A linear layer that may carry LoRA deltas, looked up by its module path at forward time.
#[derive(Clone, Debug)]
pub struct Linear {
    inner: candle_nn::Linear,
    path: String,
}

impl Linear {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self { inner: candle_nn::Linear::new(weight, bias), path: vb.prefix() })
    }

    pub fn forward(&self, x: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        let y = self.inner.forward(x)?;
        match lora.get(&self.path) {
            [] => Ok(y),
            deltas => apply_deltas(Layer::Linear, x, y, self.inner.weight(), self.inner.bias(), deltas),
        }
    }
}

/// A 2-D convolution that may carry LoRA deltas (kohya "LoCon", LyCORIS, DoRA).
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: candle_nn::Conv2dConfig,
    path: String,
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = vb.get((out_c, in_c, kernel, kernel), "weight")?;
        let bias = if bias { Some(vb.get(out_c, "bias")?) } else { None };
        let cfg = candle_nn::Conv2dConfig { padding, stride, ..Default::default() };
        Ok(Self { weight, bias, cfg, path: vb.prefix() })
    }

    fn conv(&self, x: &Tensor, w: &Tensor, cfg: &candle_nn::Conv2dConfig) -> Result<Tensor> {
        x.conv2d(w, cfg.padding, cfg.stride, cfg.dilation, cfg.groups)
    }

    pub fn forward(&self, x: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        let mut y = self.conv(x, &self.weight, &self.cfg)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
        }
        match lora.get(&self.path) {
            [] => Ok(y),
            deltas => apply_deltas(Layer::Conv2d(&self.cfg), x, y, &self.weight, self.bias.as_ref(), deltas),
        }
    }
}

/// Group normalisation over NCHW input (composed of differentiable ops; f16 computed in f32).
#[derive(Clone, Debug)]
pub struct GroupNorm(candle_nn::GroupNorm);

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self(candle_nn::group_norm(groups, channels, eps, vb)?))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }
}

/// Layer normalisation over the last dimension.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() || x.dtype() == DType::F64 {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32)
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// Softmax over the last dimension; the fused kernel only when no gradient is needed.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() || x.dtype() == DType::F64 {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Scaled dot-product attention over `[batch, heads, seq, head_dim]` tensors, with an
/// optional additive mask broadcast onto the `[batch, heads, q_len, k_len]` scores. `upcast`
/// computes the scores in f32 for half-precision inputs (diffusers' `upcast_attention`).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    upcast: bool,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let (q, k) = if upcast && matches!(dtype, DType::F16 | DType::BF16) {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    } else {
        (q.clone(), k.clone())
    };
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let mut scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    }
    let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
    probs.matmul(&v.contiguous()?)
}
