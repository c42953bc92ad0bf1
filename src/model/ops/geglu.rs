//! GEGLU, `a · gelu(b)` for input rows `[a | b]` (the feed-forward gate of the transformer
//! blocks), as one op: the graph keeps the input and the output, not the two halves and the
//! GELU in between; the backward pass recomputes the GELU.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{self, by_dtype, simd_dispatch, Float};
use super::softmax::rows_per_task;

/// `gelu(x) = x·Φ(x)` with the exact (erf) normal CDF, and its derivative `Φ(x) + x·φ(x)`.
#[inline(always)]
fn gelu_and_grad<T: Float>(x: T) -> (T, T) {
    let half = T::from_f64(0.5);
    let cdf = half * (T::one() + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf_fast());
    let pdf = T::from_f64(0.398_942_280_401_432_7) * (-half * x * x).exp_fast();
    (x * cdf, cdf + x * pdf)
}

#[inline(always)]
fn forward_rows_impl<T: Float>(h: &[T], y: &mut [T], d: usize) {
    for (h, y) in h.chunks_exact(2 * d).zip(y.chunks_exact_mut(d)) {
        let (a, b) = h.split_at(d);
        for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
            *y = a * gelu_and_grad(b).0;
        }
    }
}

simd_dispatch! {
    fn forward_rows<T: Float>(h: &[T], y: &mut [T], d: usize) = forward_rows_impl;
}

#[inline(always)]
fn backward_rows_impl<T: Float>(h: &[T], g: &[T], dh: &mut [T], d: usize) {
    for ((h, g), dh) in h.chunks_exact(2 * d).zip(g.chunks_exact(d)).zip(dh.chunks_exact_mut(2 * d)) {
        let (a, b) = h.split_at(d);
        let (da, db) = dh.split_at_mut(d);
        for ((((da, db), &a), &b), &g) in da.iter_mut().zip(db.iter_mut()).zip(a).zip(b).zip(g) {
            let (gelu, grad) = gelu_and_grad(b);
            *da = g * gelu;
            *db = g * a * grad;
        }
    }
}

simd_dispatch! {
    fn backward_rows<T: Float>(h: &[T], g: &[T], dh: &mut [T], d: usize) = backward_rows_impl;
}

struct Geglu;

fn forward<T: Float>(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
    let d = l.dims().last().copied().unwrap_or(0) / 2;
    let h = cpu::contiguous::<T>(s, l)?;
    let mut y = vec![T::zero(); h.len() / 2];
    let rows = rows_per_task(2 * d);
    y.par_chunks_mut(rows * d).zip(h.par_chunks(rows * 2 * d)).for_each(|(y, h)| forward_rows(h, y, d));
    Ok(T::to_cpu_storage_owned(y))
}

fn backward<T: Float>(h: &Tensor, g: &Tensor) -> Result<Tensor> {
    let d = h.dims().last().copied().unwrap_or(0) / 2;
    let rows = rows_per_task(2 * d);
    cpu::with_data::<T, _>(h, |hd| {
        cpu::with_data::<T, _>(g, |gd| {
            let mut dh = vec![T::zero(); hd.len()];
            dh.par_chunks_mut(rows * 2 * d)
                .zip(hd.par_chunks(rows * 2 * d))
                .zip(gd.par_chunks(rows * d))
                .for_each(|((dh, h), g)| backward_rows(h, g, dh, d));
            cpu::tensor(dh, h.shape())
        })
    })
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "sdserve-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut dims = l.dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last % 2 == 0 => *last /= 2,
            _ => candle_core::bail!("geglu: the last dimension of {:?} must be even", l.dims()),
        }
        let y = by_dtype!(s.dtype(), forward(s, l))?;
        Ok((y, Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        by_dtype!(h.dtype(), backward(h, g)).map(Some)
    }
}

/// `a · gelu(b)` for an f32/f64 CPU tensor whose last dimension is `[a | b]`.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    h.apply_op1(Geglu)
}
