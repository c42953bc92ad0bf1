//! Sanity limits on adapter values, so that a broken or hostile file is refused instead of
//! turning every image black: each stored value finite and within half precision's range,
//! and no module able to change one weight element by more than [`MAX_UPDATE`].

use candle_core::{Result, Tensor};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::lycoris::{HadaPair, KronFactor};
use super::update::Update;

/// The largest magnitude a stored value (factor, alpha, DoRA magnitude) may have: half
/// precision's largest finite number. Real adapters stay orders of magnitude below it, and
/// larger values overflow when the model is served in f16.
pub const MAX_VALUE: f64 = 65504.0;

/// The largest change one module may make to one weight element, as bounded by its factors
/// (before the request weight). Real adapters stay below 10³.
pub const MAX_UPDATE: f64 = 1e4;

/// The largest absolute value of a float tensor (NaN when any value is NaN, infinity when
/// one is infinite), read straight from the file's bytes.
pub fn max_abs(view: &TensorView) -> f64 {
    let data = view.data();
    let values: Box<dyn Iterator<Item = f64> + '_> = match view.dtype() {
        Dtype::F16 => Box::new(data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64())),
        Dtype::BF16 => Box::new(data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64())),
        Dtype::F32 => Box::new(data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)),
        Dtype::F64 => Box::new(data.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))),
        _ => return 0.0,
    };
    values.fold(0.0, |m: f64, v| if v.is_nan() || m.is_nan() { f64::NAN } else { m.max(v.abs()) })
}

/// What is wrong with a stored value's magnitude `m`, if anything.
pub fn problem(m: f64) -> Option<&'static str> {
    if !m.is_finite() {
        Some("non-finite values (NaN or Inf)")
    } else if m > MAX_VALUE {
        Some("values beyond ±65504 (half precision's range; no real adapter comes near)")
    } else {
        None
    }
}

fn max(t: &Tensor) -> Result<f64> {
    t.abs()?.flatten_all()?.max(0)?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()
}

/// The rank of the first dimension of `t`.
fn rank(t: &Tensor) -> f64 {
    t.dims()[0] as f64
}

fn hada_pair(p: &HadaPair) -> Result<f64> {
    let products = max(&p.a)? * max(&p.b)?;
    Ok(match &p.t {
        Some(t) => products * max(t)? * rank(t) * t.dims()[1] as f64,
        None => products * rank(&p.b),
    })
}

fn kron_factor(f: &KronFactor) -> Result<f64> {
    match f {
        KronFactor::Full(w) => max(w),
        KronFactor::LowRank { a, b } => Ok(max(a)? * max(b)? * rank(b)),
        KronFactor::Tucker { t, a, b } => Ok(max(t)? * max(a)? * max(b)? * rank(t) * t.dims()[1] as f64),
    }
}

/// An upper bound on `|ΔW|` of any element, from the factors' largest values and ranks.
pub fn update_bound(u: &Update) -> Result<f64> {
    match u {
        Update::LowRank { down, up } => Ok(max(up)? * max(down)? * rank(down)),
        Update::Tucker { down, mid, up } => Ok(max(up)? * max(mid)? * max(down)? * rank(mid) * mid.dims()[1] as f64),
        Update::Hadamard(h) => Ok(hada_pair(&h.w1)? * hada_pair(&h.w2)?),
        Update::Kronecker(k) => Ok(kron_factor(&k.w1)? * kron_factor(&k.w2)?),
    }
}
