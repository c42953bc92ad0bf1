//! The weight update ΔW an adapter module adds to its base weight, in each supported
//! factorisation (LoRA / LoCon, LoCon with a Tucker core, LoHa, LoKr).

use candle_core::{Result, Tensor};

use super::lycoris::{kron, tucker, Hadamard, Kronecker};

/// A module's update before scaling. Every tensor is f32; the dense weight has the base
/// weight's shape (`[out, in]` or `[out, in, kh, kw]`).
#[derive(Clone, Debug)]
pub enum Update {
    /// LoRA / LoCon: `up · down`, down `[r, in]` or `[r, in, kh, kw]`, up `[out, r]` or
    /// `[out, r, 1, 1]`. Applied as two small layers, never materialised.
    LowRank { down: Tensor, up: Tensor },
    /// LoCon with `lora_mid` (kohya / LyCORIS "Tucker"): down `[r, in, 1, 1]`, mid
    /// `[r, r, kh, kw]`, up `[out, r, 1, 1]`; ΔW = `Σ up[o, n] · mid[n, m, ·, ·] · down[m, i]`.
    Tucker { down: Tensor, mid: Tensor, up: Tensor },
    /// LoHa: the Hadamard product of two low-rank products.
    Hadamard(Hadamard),
    /// LoKr: the Kronecker product of two factors.
    Kronecker(Kronecker),
}

impl Update {
    /// The dense ΔW reshaped to `base` (the base weight's shape).
    pub fn weight(&self, base: &[usize]) -> Result<Tensor> {
        let w = match self {
            Update::LowRank { down, up } => up.flatten_from(1)?.matmul(&down.flatten_from(1)?)?,
            Update::Tucker { down, mid, up } => {
                tucker(mid, &up.flatten_from(1)?.t()?, &down.flatten_from(1)?)?
            }
            Update::Hadamard(h) => h.weight()?,
            Update::Kronecker(k) => kron(&k.w1.weight()?, &k.w2.weight()?.flatten_from(1)?)?,
        };
        w.reshape(base)
    }

    /// The rank that divides alpha: `None` for a LoKr made of full factors, which LyCORIS
    /// applies unscaled.
    pub fn scale_rank(&self) -> Option<usize> {
        match self {
            Update::LowRank { down, .. } | Update::Tucker { down, .. } => Some(down.dims()[0]),
            Update::Hadamard(h) => Some(h.rank()),
            Update::Kronecker(k) => k.rank(),
        }
    }

    /// The rank reported for the module (0 for a LoKr of full factors).
    pub fn rank(&self) -> usize {
        self.scale_rank().unwrap_or(0)
    }

    /// Every factor tensor.
    pub fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Update::LowRank { down, up } => vec![down, up],
            Update::Tucker { down, mid, up } => vec![down, mid, up],
            Update::Hadamard(h) => h.tensors(),
            Update::Kronecker(k) => [k.w1.tensors(), k.w2.tensors()].concat(),
        }
    }

    /// The factors of a plain LoRA, if this is one.
    pub fn low_rank(&self) -> Option<(&Tensor, &Tensor)> {
        match self {
            Update::LowRank { down, up } => Some((down, up)),
            _ => None,
        }
    }
}
