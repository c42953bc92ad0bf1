//! Differentiable building blocks shared by the UNet, VAE and CLIP models.
//!
//! Every layer here has a backward pass: when the input is part of an autograd graph the
//! composed (slow) softmax / layer-norm is used, otherwise candle's fused kernels.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::lora::{apply_deltas, Layer, LoraSet};
use crate::model::ops;

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
        let y = linear(x, &self.inner)?;
        match lora.get(&self.path) {
            [] => Ok(y),
            deltas => apply_deltas(Layer::Linear, run_layer, x, y, self.inner.weight(), self.inner.bias(), deltas),
        }
    }
}

/// `x·Wᵀ + b` over the last dimension. On the CPU (f32/f64) its backward pass computes the
/// weight and bias gradients only when they are trained, not for frozen weights.
pub fn linear(x: &Tensor, layer: &candle_nn::Linear) -> Result<Tensor> {
    if ops::native(x) {
        ops::linear::linear(x, layer.weight(), layer.bias())
    } else {
        // candle-nn 0.11.1 multiplies a strided batched input by the broadcast weight, and
        // that product's input gradient is wrong for batch > 1; contiguous input avoids it.
        layer.forward(&x.contiguous()?)
    }
}

/// How adapters run their products ([`crate::lora::Kernel`]): as the base layers do.
fn run_layer(layer: Layer, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    match layer {
        Layer::Linear => linear(x, &candle_nn::Linear::new(w.clone(), None)),
        Layer::Conv2d(cfg) => Conv2d::conv(x, w, None, cfg),
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

    /// `x ⋆ w (+ bias)`: on the CPU (f32/f64) through GEMM, with a backward pass that
    /// computes the kernel and bias gradients only when they are trained.
    fn conv(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, cfg: &candle_nn::Conv2dConfig) -> Result<Tensor> {
        let square = w.dim(2)? == w.dim(3)?;
        if ops::native(x) && square && cfg.dilation == 1 && cfg.groups == 1 {
            return ops::conv::conv2d(x, w, bias, cfg.stride, cfg.padding);
        }
        let y = x.conv2d(w, cfg.padding, cfg.stride, cfg.dilation, cfg.groups)?;
        match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }

    pub fn forward(&self, x: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        let y = Self::conv(x, &self.weight, self.bias.as_ref(), &self.cfg)?;
        match lora.get(&self.path) {
            [] => Ok(y),
            deltas => apply_deltas(Layer::Conv2d(&self.cfg), run_layer, x, y, &self.weight, self.bias.as_ref(), deltas),
        }
    }
}

/// Group normalisation over `[batch, channels, ...]` input: a fused kernel with its backward
/// pass on the CPU (half precision computed in f32), the composed ops elsewhere.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    composed: candle_nn::GroupNorm,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
        let composed = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self { weight, bias, groups, eps, composed })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }

    /// `silu(group_norm(x))`, in one pass on the CPU.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if ops::kernels_for(x) {
            let dt = ops::kernel_dtype(x.dtype());
            let (w, b) = (self.weight.to_dtype(dt)?, self.bias.to_dtype(dt)?);
            return ops::norm::group_norm(&x.to_dtype(dt)?, self.groups, &w, &b, self.eps, silu)?.to_dtype(x.dtype());
        }
        let y = self.composed.forward(x)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

/// Layer normalisation over the last dimension: a fused kernel with its backward pass on the
/// CPU; elsewhere candle's fused op when no gradient is needed, else the composed one.
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
        if ops::kernels_for(x) {
            let dt = ops::kernel_dtype(x.dtype());
            let (w, b) = (self.weight.to_dtype(dt)?, self.bias.to_dtype(dt)?);
            ops::norm::layer_norm(&x.to_dtype(dt)?, &w, &b, self.eps)?.to_dtype(x.dtype())
        } else if x.track_op() || x.dtype() == DType::F64 {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32)
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// Softmax over the last dimension: the fused kernel with its backward pass on the CPU;
/// elsewhere candle's fused op when no gradient is needed, else the composed one.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if ops::kernels_for(x) {
        ops::softmax::softmax_last_dim(&x.to_dtype(ops::kernel_dtype(x.dtype()))?)?.to_dtype(x.dtype())
    } else if x.track_op() || x.dtype() == DType::F64 {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// GEGLU `a · gelu(b)` (exact erf GELU) of input `[..., a | b]`: one fused op with its
/// backward pass on the CPU (f32/f64), the composed ops elsewhere.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if ops::native(h) {
        return ops::geglu::geglu(h);
    }
    let half = h.dim(D::Minus1)? / 2;
    h.narrow(D::Minus1, 0, half)? * h.narrow(D::Minus1, half, half)?.gelu_erf()?
}

/// Score elements per query chunk of the composed attention when no gradient is needed.
const COMPOSED_CHUNK_SCORES: usize = 1 << 26;

/// Scaled dot-product attention over `[batch, heads, seq, head_dim]` tensors, with an
/// optional constant additive mask broadcast onto the `[batch, heads, q_len, k_len]` scores.
/// On the CPU a memory-efficient kernel computes it (half precision in f32); elsewhere
/// `upcast` computes the scores in f32 for half-precision inputs (diffusers'
/// `upcast_attention`) and, without gradient, queries are processed in chunks.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    upcast: bool,
) -> Result<Tensor> {
    if ops::kernels_for(q) && !mask.is_some_and(Tensor::track_op) {
        let dt = ops::kernel_dtype(q.dtype());
        let out = ops::attention::attention(&q.to_dtype(dt)?, &k.to_dtype(dt)?, &v.to_dtype(dt)?, mask)?;
        return out.to_dtype(q.dtype());
    }
    let (b, h, q_len, _) = q.dims4()?;
    let rows = (COMPOSED_CHUNK_SCORES / (b * h * k.dim(2)?).max(1)).max(1);
    if q.track_op() || k.track_op() || v.track_op() || rows >= q_len {
        return composed_attention(q, k, v, mask, upcast);
    }
    let chunks = (0..q_len)
        .step_by(rows)
        .map(|r| {
            let n = rows.min(q_len - r);
            let m = match mask {
                Some(m) => Some(m.broadcast_as((b, h, q_len, k.dim(2)?))?.narrow(2, r, n)?),
                None => None,
            };
            composed_attention(&q.narrow(2, r, n)?, k, v, m.as_ref(), upcast)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&chunks, 2)
}

fn composed_attention(
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
