//! Softmax over the last dimension: one fused, multi-threaded pass forward, and the backward
//! `dx = y ∘ (g − Σ g∘y)` from the output alone.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{self, by_dtype, simd_dispatch, Float};

/// Rows of `width` elements per parallel task (about 64 K elements).
pub(super) fn rows_per_task(width: usize) -> usize {
    (1 << 16) / width.max(1) + 1
}

#[inline(always)]
fn softmax_rows_impl<T: Float>(block: &mut [T], width: usize) {
    for row in block.chunks_exact_mut(width) {
        let inv = T::one() / cpu::exp_shifted(row, cpu::max(row));
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

simd_dispatch! {
    /// Softmax of each `width`-long row of `block`, in place.
    fn softmax_rows<T: Float>(block: &mut [T], width: usize) = softmax_rows_impl;
}

#[inline(always)]
fn softmax_grad_rows_impl<T: Float>(dx: &mut [T], y: &[T], g: &[T], width: usize) {
    for ((dx, y), g) in dx.chunks_exact_mut(width).zip(y.chunks_exact(width)).zip(g.chunks_exact(width)) {
        let s = cpu::dot(g, y);
        for ((d, &y), &g) in dx.iter_mut().zip(y).zip(g) {
            *d = y * (g - s);
        }
    }
}

simd_dispatch! {
    /// `dx = y ∘ (g − Σ g∘y)` row by row.
    fn softmax_grad_rows<T: Float>(dx: &mut [T], y: &[T], g: &[T], width: usize) = softmax_grad_rows_impl;
}

fn forward<T: Float>(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
    let width = l.dims().last().copied().unwrap_or(1);
    let mut out = cpu::contiguous::<T>(s, l)?.into_owned();
    out.par_chunks_mut(rows_per_task(width) * width).for_each(|block| softmax_rows(block, width));
    Ok(T::to_cpu_storage_owned(out))
}

fn backward<T: Float>(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let width = y.dims().last().copied().unwrap_or(1);
    let per = rows_per_task(width) * width;
    cpu::with_data::<T, _>(y, |y_data| {
        cpu::with_data::<T, _>(g, |g| {
            let mut dx = vec![T::zero(); y_data.len()];
            dx.par_chunks_mut(per)
                .zip(y_data.par_chunks(per))
                .zip(g.par_chunks(per))
                .for_each(|((dx, y), g)| softmax_grad_rows(dx, y, g, width));
            cpu::tensor(dx, y.shape())
        })
    })
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "sdserve-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((by_dtype!(s.dtype(), forward(s, l))?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        by_dtype!(y.dtype(), backward(y, g)).map(Some)
    }
}

/// Softmax over the last dimension of an f32/f64 CPU tensor.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.apply_op1(SoftmaxLastDim)
}
