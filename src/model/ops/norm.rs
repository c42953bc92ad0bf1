//! GroupNorm (optionally fused with the SiLU that follows it) and LayerNorm as one
//! normalisation op with a hand-written backward pass.
//!
//! Both normalise contiguous segments of the input: a `(batch, group)` block of
//! `channels/groups · spatial` elements for GroupNorm, a row for LayerNorm. Element `i` of a
//! segment belongs to affine channel `base + i / inner` (`inner` = spatial size for GroupNorm,
//! 1 for LayerNorm). The forward pass keeps only each segment's mean and 1/σ; the backward
//! recomputes the normalised input (and the SiLU) from `x`, so the graph holds `x` and `y`.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{self, by_dtype, simd_dispatch, Float};

/// How the segments map onto affine channels.
#[derive(Clone, Copy, Debug)]
struct Segments {
    /// Elements per segment.
    len: usize,
    /// Consecutive elements sharing one affine channel.
    inner: usize,
    /// Segments per affine cycle (groups for GroupNorm, 1 for LayerNorm).
    groups: usize,
}

impl Segments {
    fn channels(&self) -> usize {
        self.len / self.inner
    }

    /// First affine channel of segment `s`.
    fn base(&self, s: usize) -> usize {
        (s % self.groups) * self.channels()
    }

    /// Segments per parallel task (about 64 K elements).
    fn per_task(&self) -> usize {
        ((1 << 16) / self.len).max(1)
    }
}

/// Mean and `1/σ` of one segment in one pass: Σx and Σx² accumulated in f64.
#[inline(always)]
fn moments<T: Float>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let (mut s, mut q) = ([0f64; 8], [0f64; 8]);
    let chunks = x.chunks_exact(8);
    let (mut ts, mut tq) = (0f64, 0f64);
    for v in chunks.remainder() {
        ts += v.wide();
        tq += v.wide() * v.wide();
    }
    for c in chunks {
        for i in 0..8 {
            let v = c[i].wide();
            s[i] += v;
            q[i] += v * v;
        }
    }
    let mean = (s.iter().sum::<f64>() + ts) / n;
    let var = ((q.iter().sum::<f64>() + tq) / n - mean * mean).max(0.0);
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline(always)]
fn silu<T: Float>(z: T) -> T {
    z / (T::one() + (-z).exp_fast())
}

/// `d silu(z) / dz = σ(z)·(1 + z·(1 − σ(z)))`.
#[inline(always)]
fn silu_grad<T: Float>(z: T) -> T {
    let s = T::one() / (T::one() + (-z).exp_fast());
    s * (T::one() + z * (T::one() - s))
}

/// Normalises the segments of a task block; writes `y` and each segment's (mean, 1/σ).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_block_impl<T: Float>(
    x: &[T],
    y: &mut [T],
    stats: &mut [(f64, f64)],
    first: usize,
    seg: Segments,
    w: &[T],
    b: &[T],
    eps: f64,
    silu_after: bool,
) {
    for (k, ((x, y), st)) in x.chunks_exact(seg.len).zip(y.chunks_exact_mut(seg.len)).zip(stats.iter_mut()).enumerate() {
        let (mean, rstd) = moments(x, eps);
        *st = (mean, rstd);
        let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
        if seg.inner == 1 {
            for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                let z = (x - mean) * rstd * w + b;
                *y = if silu_after { silu(z) } else { z };
            }
            continue;
        }
        let base = seg.base(first + k);
        for (c, (x, y)) in x.chunks_exact(seg.inner).zip(y.chunks_exact_mut(seg.inner)).enumerate() {
            let a = rstd * w[base + c];
            let shift = b[base + c] - mean * a;
            for (y, &x) in y.iter_mut().zip(x) {
                let z = x * a + shift;
                *y = if silu_after { silu(z) } else { z };
            }
        }
    }
}

simd_dispatch! {
    fn forward_block<T: Float>(
        x: &[T], y: &mut [T], stats: &mut [(f64, f64)], first: usize, seg: Segments, w: &[T], b: &[T], eps: f64, silu_after: bool,
    ) = forward_block_impl;
}

/// Backward pass of the segments of a task block: writes `dx`, and accumulates the affine
/// gradients into `dw`/`db` (indexed by channel).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_block_impl<T: Float>(
    x: &[T],
    g: &[T],
    dx: &mut [T],
    stats: &[(f64, f64)],
    first: usize,
    seg: Segments,
    w: &[T],
    b: &[T],
    silu_after: bool,
    dw: &mut [f64],
    db: &mut [f64],
) {
    let n = seg.len as f64;
    for (k, ((x, g), dx)) in x.chunks_exact(seg.len).zip(g.chunks_exact(seg.len)).zip(dx.chunks_exact_mut(seg.len)).enumerate() {
        let (mean, rstd) = stats[k];
        let (mean_t, rstd_t) = (T::from_f64(mean), T::from_f64(rstd));
        let base = seg.base(first + k);
        // Pass 1: gradient at the affine output (through the SiLU), kept in `dx`, and the
        // sums Σ dx̂ and Σ dx̂·x̂ with dx̂ = w·gz.
        let (mut s1, mut s2) = (0f64, 0f64);
        if seg.inner == 1 {
            let (mut l1, mut l2) = (T::zero(), T::zero());
            for (i, ((&x, &g), dx)) in x.iter().zip(g).zip(dx.iter_mut()).enumerate() {
                let xhat = (x - mean_t) * rstd_t;
                let gz = if silu_after { g * silu_grad(xhat * w[i] + b[i]) } else { g };
                *dx = gz;
                dw[i] += (gz * xhat).wide();
                db[i] += gz.wide();
                l1 += gz * w[i];
                l2 += gz * w[i] * xhat;
            }
            (s1, s2) = (l1.wide(), l2.wide());
        }
        let channels = if seg.inner == 1 { 0 } else { seg.channels() };
        for c in 0..channels {
            let range = c * seg.inner..(c + 1) * seg.inner;
            let (x, g, dx) = (&x[range.clone()], &g[range.clone()], &mut dx[range]);
            let (wc, bc) = (w[base + c], b[base + c]);
            let (mut sw, mut sb) = ([T::zero(); 8], [T::zero(); 8]);
            let mut lanes = x.chunks_exact(8).zip(g.chunks_exact(8)).zip(dx.chunks_exact_mut(8));
            for ((x, g), dx) in &mut lanes {
                for l in 0..8 {
                    let xhat = (x[l] - mean_t) * rstd_t;
                    let gz = if silu_after { g[l] * silu_grad(xhat * wc + bc) } else { g[l] };
                    dx[l] = gz;
                    sw[l] += gz * xhat;
                    sb[l] += gz;
                }
            }
            let done = x.len() / 8 * 8;
            for j in done..x.len() {
                let xhat = (x[j] - mean_t) * rstd_t;
                let gz = if silu_after { g[j] * silu_grad(xhat * wc + bc) } else { g[j] };
                dx[j] = gz;
                sw[0] += gz * xhat;
                sb[0] += gz;
            }
            let (sw, sb) = (sw.iter().map(|v| v.wide()).sum::<f64>(), sb.iter().map(|v| v.wide()).sum::<f64>());
            dw[base + c] += sw;
            db[base + c] += sb;
            s1 += sb * wc.wide();
            s2 += sw * wc.wide();
        }
        // Pass 2: dx = (dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) / σ.
        let (m1, m2) = (T::from_f64(s1 / n), T::from_f64(s2 / n));
        for (c, (x, dx)) in x.chunks_exact(seg.inner).zip(dx.chunks_exact_mut(seg.inner)).enumerate() {
            let wc = w[base + c];
            for (&x, dx) in x.iter().zip(dx.iter_mut()) {
                let xhat = (x - mean_t) * rstd_t;
                *dx = rstd_t * (*dx * wc - m1 - xhat * m2);
            }
        }
    }
}

simd_dispatch! {
    fn backward_block<T: Float>(
        x: &[T], g: &[T], dx: &mut [T], stats: &[(f64, f64)], first: usize, seg: Segments, w: &[T], b: &[T], silu_after: bool,
        dw: &mut [f64], db: &mut [f64],
    ) = backward_block_impl;
}

/// The normalisation op over `(x, weight, bias)`.
struct Norm {
    seg: Segments,
    eps: f64,
    silu: bool,
    /// Per-segment (mean, 1/σ), written by the forward pass.
    stats: Mutex<Vec<(f64, f64)>>,
}

impl Norm {
    fn forward<T: Float>(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<CpuStorage> {
        let x = cpu::contiguous::<T>(xs, xl)?;
        let (w, b) = (cpu::contiguous::<T>(ws, wl)?, cpu::contiguous::<T>(bs, bl)?);
        let seg = self.seg;
        let mut y = vec![T::zero(); x.len()];
        let mut stats = vec![(0.0, 0.0); x.len() / seg.len];
        let per = seg.per_task();
        y.par_chunks_mut(per * seg.len)
            .zip(x.par_chunks(per * seg.len))
            .zip(stats.par_chunks_mut(per))
            .enumerate()
            .for_each(|(t, ((y, x), st))| forward_block(x, y, st, t * per, seg, &w, &b, self.eps, self.silu));
        *self.stats.lock().expect("norm stats lock") = stats;
        Ok(T::to_cpu_storage_owned(y))
    }

    fn backward<T: Float>(&self, x: &Tensor, w: &Tensor, b: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let seg = self.seg;
        let stats = self.stats.lock().expect("norm stats lock").clone();
        if stats.len() * seg.len != x.elem_count() {
            candle_core::bail!("norm backward before forward");
        }
        let per = seg.per_task();
        let channels = w.elem_count();
        let (dx, dw, db) = cpu::with_data::<T, _>(x, |xd| {
            cpu::with_data::<T, _>(g, |gd| {
                cpu::with_data::<T, _>(w, |wd| {
                    cpu::with_data::<T, _>(b, |bd| {
                        let mut dx = vec![T::zero(); xd.len()];
                        let (dw, db) = dx
                            .par_chunks_mut(per * seg.len)
                            .zip(xd.par_chunks(per * seg.len))
                            .zip(gd.par_chunks(per * seg.len))
                            .zip(stats.par_chunks(per))
                            .enumerate()
                            .fold(
                                || (vec![0f64; channels], vec![0f64; channels]),
                                |(mut dw, mut db), (t, (((dx, x), g), st))| {
                                    backward_block(x, g, dx, st, t * per, seg, wd, bd, self.silu, &mut dw, &mut db);
                                    (dw, db)
                                },
                            )
                            .reduce(
                                || (vec![0f64; channels], vec![0f64; channels]),
                                |(mut a, mut b), (c, d)| {
                                    a.iter_mut().zip(c).for_each(|(a, c)| *a += c);
                                    b.iter_mut().zip(d).for_each(|(b, d)| *b += d);
                                    (a, b)
                                },
                            );
                        Ok((dx, dw, db))
                    })
                })
            })
        })?;
        let to_t = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
        Ok((cpu::tensor(dx, x.shape())?, cpu::tensor(to_t(dw), w.shape())?, cpu::tensor(to_t(db), b.shape())?))
    }
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "sdserve-norm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(xs.dtype(), self.forward(xs, xl, ws, wl, bs, bl))?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = by_dtype!(x.dtype(), self.backward(x, w, b, g))?;
        Ok((x.track_op().then_some(dx), w.track_op().then_some(dw), b.track_op().then_some(db)))
    }
}

fn apply(x: &Tensor, w: &Tensor, b: &Tensor, seg: Segments, eps: f64, silu: bool) -> Result<Tensor> {
    if seg.len == 0 || !x.elem_count().is_multiple_of(seg.len) || !seg.len.is_multiple_of(seg.inner) || w.elem_count() != seg.groups * seg.channels() {
        candle_core::bail!("norm kernel: shape {:?} does not fit {seg:?} with {} channels", x.dims(), w.elem_count());
    }
    x.apply_op3(w, b, Norm { seg, eps, silu, stats: Mutex::new(Vec::new()) })
}

/// GroupNorm of an f32/f64 CPU tensor `[batch, channels, ...]`, followed by SiLU if `silu`.
pub fn group_norm(x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f64, silu: bool) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group norm: {groups} groups do not divide the channels of {dims:?}");
    }
    let inner: usize = dims[2..].iter().product();
    apply(x, weight, bias, Segments { len: dims[1] / groups * inner, inner, groups }, eps, silu)
}

/// LayerNorm over the last dimension of an f32/f64 CPU tensor.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(1);
    apply(x, weight, bias, Segments { len: d, inner: 1, groups: 1 }, eps, false)
}
