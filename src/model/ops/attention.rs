//! Memory-efficient scaled dot-product attention: queries are processed in chunks, each
//! chunk's scores `[rows, k_len]` live only in a per-thread buffer, so the full
//! `[batch·heads, q_len, k_len]` matrix never exists. The forward keeps one log-sum-exp per
//! query row; the backward recomputes each chunk's probabilities from it (flash-attention
//! style), so the autograd graph holds only q, k, v and the output.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{self, by_dtype, simd_dispatch, Float, Mat, SharedMut};

/// Score elements per chunk buffer (4 MiB of f32).
const CHUNK_ELEMS: usize = 1 << 20;
/// Most query rows per chunk.
const MAX_CHUNK: usize = 256;

/// A `[batch, heads, seq, dim]` operand read through its strides.
#[derive(Clone, Copy)]
struct Heads<'a, T> {
    data: &'a [T],
    offset: usize,
    stride: [usize; 4],
    heads: usize,
}

impl<'a, T> Heads<'a, T> {
    fn new(data: &'a [T], l: &Layout) -> Result<Self> {
        let s = l.stride();
        if s.len() != 4 {
            candle_core::bail!("attention kernel: expected rank-4 operands, got {:?}", l.dims());
        }
        Ok(Self { data, offset: l.start_offset(), stride: [s[0], s[1], s[2], s[3]], heads: l.dims()[1] })
    }

    /// Rows `row0..` of head `bh` (= batch · heads + head) as a `[rows, dim]` matrix.
    fn rows(&self, bh: usize, row0: usize) -> Mat<'a, T> {
        let (b, h) = (bh / self.heads, bh % self.heads);
        let offset = self.offset + b * self.stride[0] + h * self.stride[1] + row0 * self.stride[2];
        Mat { data: self.data, offset, rs: self.stride[2], cs: self.stride[3] }
    }
}

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    bh: usize,
    heads: usize,
    q_len: usize,
    k_len: usize,
    dim: usize,
    v_dim: usize,
    /// Query rows per chunk.
    chunk: usize,
}

impl Dims {
    fn new(q: &Layout, k: &Layout, v: &Layout, max_chunk: usize) -> Result<Self> {
        let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
        if qd.len() != 4 || kd.len() != 4 || vd.len() != 4 || qd[..2] != kd[..2] || kd[..3] != vd[..3] || qd[3] != kd[3] {
            candle_core::bail!("attention kernel: incompatible shapes q {qd:?}, k {kd:?}, v {vd:?}");
        }
        let chunk = (CHUNK_ELEMS / kd[2].max(1)).max(16).min(max_chunk).min(qd[2]).max(1);
        Ok(Self { bh: qd[0] * qd[1], heads: qd[1], q_len: qd[2], k_len: kd[2], dim: qd[3], v_dim: vd[3], chunk })
    }

    /// Offset of row `row` of head `bh` in a token-major `[batch, len, heads, width]` buffer.
    fn token_major(&self, bh: usize, row: usize, len: usize, width: usize) -> usize {
        let (b, h) = (bh / self.heads, bh % self.heads);
        ((b * len + row) * self.heads + h) * width
    }

    fn chunks(&self) -> usize {
        self.q_len.div_ceil(self.chunk)
    }
}

/// The additive mask, broadcast to `[batch, heads, q_len, k_len]` and read through strides.
struct MaskView<'a, T> {
    data: &'a [T],
    offset: usize,
    stride: [usize; 4],
    heads: usize,
}

impl<T: Float> MaskView<'_, T> {
    /// Adds the mask rows `row0..row0 + rows` of head `bh` to the scores.
    fn add_to(&self, scores: &mut [T], bh: usize, row0: usize, k_len: usize) {
        let (b, h) = (bh / self.heads, bh % self.heads);
        let base = self.offset + b * self.stride[0] + h * self.stride[1];
        for (i, row) in scores.chunks_exact_mut(k_len).enumerate() {
            let r = base + (row0 + i) * self.stride[2];
            for (j, s) in row.iter_mut().enumerate() {
                *s += self.data[r + j * self.stride[3]];
            }
        }
    }
}

#[inline(always)]
fn exp_rows_impl<T: Float>(s: &mut [T], k_len: usize, lse: &mut [T], inv: &mut [T]) {
    for ((row, l), inv) in s.chunks_exact_mut(k_len).zip(lse.iter_mut()).zip(inv.iter_mut()) {
        let m = cpu::max(row);
        let total = cpu::exp_shifted(row, m);
        *l = m + total.ln();
        *inv = T::one() / total;
    }
}

simd_dispatch! {
    /// Replaces each score row by `e^(s − max)`; writes the row's log-sum-exp and `1 / Σ`.
    fn exp_rows<T: Float>(s: &mut [T], k_len: usize, lse: &mut [T], inv: &mut [T]) = exp_rows_impl;
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn score_grads_impl<T: Float>(p: &mut [T], dp: &mut [T], k_len: usize, lse: &[T], go: &[T], o: &[T], v_dim: usize, row_stride: usize) {
    for (i, (p, dp)) in p.chunks_exact_mut(k_len).zip(dp.chunks_exact_mut(k_len)).enumerate() {
        cpu::exp_shifted(p, lse[i]);
        let r = i * row_stride;
        let di = cpu::dot(&go[r..r + v_dim], &o[r..r + v_dim]);
        for (dp, &p) in dp.iter_mut().zip(p.iter()) {
            *dp = p * (*dp - di);
        }
    }
}

simd_dispatch! {
    /// Turns scores into probabilities `P = e^(s − lse)` and `dP = dO·Vᵀ` into the score
    /// gradient `dS = P ∘ (dP − rowsum(dO ∘ O))`, row by row (`dO`/`O` rows `row_stride` apart).
    fn score_grads<T: Float>(p: &mut [T], dp: &mut [T], k_len: usize, lse: &[T], go: &[T], o: &[T], v_dim: usize, row_stride: usize) = score_grads_impl;
}

/// The attention op; `mask` (constant) is already broadcast to the scores' shape.
struct Attention {
    scale: f64,
    mask: Option<Tensor>,
    /// Per-row log-sum-exp `[batch·heads·q_len]`, written by the forward pass.
    lse: Mutex<Option<Tensor>>,
    /// Upper bound on query rows per chunk.
    max_chunk: usize,
}

/// Computes the scaled scores of rows `row0..row0 + rows` of head `bh` into `s`, mask added.
#[allow(clippy::too_many_arguments)]
fn scores<T: Float>(
    s: &mut [T],
    q: &Heads<T>,
    k: &Heads<T>,
    mask: Option<&MaskView<T>>,
    d: &Dims,
    bh: usize,
    row0: usize,
    rows: usize,
    scale: T,
) {
    cpu::gemm((rows, d.k_len, d.dim), s, 0, d.k_len, false, q.rows(bh, row0), k.rows(bh, 0).t(), scale, 1);
    if let Some(m) = mask {
        m.add_to(s, bh, row0, d.k_len);
    }
}

fn mask_view<'a, T: Float>(mask: &'a Option<(candle_core::StorageRef<'a>, &'a Layout)>, heads: usize) -> Result<Option<MaskView<'a, T>>> {
    Ok(match mask {
        Some((s, l)) => {
            let st = l.stride();
            Some(MaskView { data: cpu::storage_slice(s)?, offset: l.start_offset(), stride: [st[0], st[1], st[2], st[3]], heads })
        }
        None => None,
    })
}

impl Attention {
    fn forward<T: Float>(&self, qs: &CpuStorage, ql: &Layout, ks: &CpuStorage, kl: &Layout, vs: &CpuStorage, vl: &Layout) -> Result<CpuStorage> {
        let d = Dims::new(ql, kl, vl, self.max_chunk)?;
        let (q, k, v) = (Heads::new(qs.as_slice::<T>()?, ql)?, Heads::new(ks.as_slice::<T>()?, kl)?, Heads::new(vs.as_slice::<T>()?, vl)?);
        let mask_guard = self.mask.as_ref().map(|m| m.storage_and_layout());
        let mask = mask_view::<T>(&mask_guard, q.heads)?;
        let scale = T::from_f64(self.scale);
        // The output is token-major, [batch, q_len, heads, v_dim]: merging the heads after
        // the op is then free.
        let mut out = vec![T::zero(); d.bh * d.q_len * d.v_dim];
        let mut lse = vec![T::zero(); d.bh * d.q_len];
        let (out_w, lse_w) = (SharedMut::new(&mut out), SharedMut::new(&mut lse));
        let tasks = d.bh * d.chunks();
        let row_stride = d.heads * d.v_dim;
        (0..tasks).into_par_iter().for_each_init(
            || vec![T::zero(); d.chunk * d.k_len],
            |buf, task| {
                let (bh, row0) = (task / d.chunks(), (task % d.chunks()) * d.chunk);
                let rows = d.chunk.min(d.q_len - row0);
                let s = &mut buf[..rows * d.k_len];
                scores(s, &q, &k, mask.as_ref(), &d, bh, row0, rows, scale);
                // SAFETY: each task owns rows `row0..row0 + rows` of head `bh`.
                let l = unsafe { lse_w.slice(bh * d.q_len + row0, rows) };
                let mut inv = [T::zero(); MAX_CHUNK];
                exp_rows(s, d.k_len, l, &mut inv);
                let o = d.token_major(bh, row0, d.q_len, d.v_dim);
                // SAFETY: as above; the rows of different heads interleave but do not overlap.
                unsafe { cpu::gemm_shared((rows, d.v_dim, d.k_len), &out_w, o, row_stride, false, Mat::rows(s, 0, d.k_len), v.rows(bh, 0), T::one(), 1) };
                for (i, &inv) in inv[..rows].iter().enumerate() {
                    // SAFETY: as above.
                    let row = unsafe { out_w.slice(o + i * row_stride, d.v_dim) };
                    row.iter_mut().for_each(|x| *x *= inv);
                }
            },
        );
        *self.lse.lock().expect("attention lse lock") = Some(cpu::tensor(lse, &Shape::from(d.bh * d.q_len))?);
        Ok(T::to_cpu_storage_owned(out))
    }

    #[allow(clippy::type_complexity)]
    fn backward<T: Float>(&self, qt: &Tensor, kt: &Tensor, vt: &Tensor, out: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (qg, ql) = qt.storage_and_layout();
        let (kg, kl) = kt.storage_and_layout();
        let (vg, vl) = vt.storage_and_layout();
        let d = Dims::new(ql, kl, vl, self.max_chunk)?;
        let (q, k, v) = (Heads::new(cpu::storage_slice::<T>(&qg)?, ql)?, Heads::new(cpu::storage_slice::<T>(&kg)?, kl)?, Heads::new(cpu::storage_slice::<T>(&vg)?, vl)?);
        let mask_guard = self.mask.as_ref().map(|m| m.storage_and_layout());
        let mask = mask_view::<T>(&mask_guard, q.heads)?;
        let lse_t = self.lse.lock().expect("attention lse lock").clone();
        let Some(lse_t) = lse_t else { candle_core::bail!("attention backward before forward") };
        let scale = T::from_f64(self.scale);
        let groups = (2 * cpu::threads()).div_ceil(d.bh).clamp(1, d.chunks());
        let per_group = d.chunks().div_ceil(groups);

        // Gradients are token-major like the output: [batch, len, heads, width].
        let mut dq = vec![T::zero(); d.bh * d.q_len * d.dim];
        let dq_w = SharedMut::new(&mut dq);
        let (o_rs, q_rs) = (d.heads * d.v_dim, d.heads * d.dim);
        let parts: Vec<(Vec<T>, Vec<T>)> = cpu::with_data::<T, _>(&lse_t, |lse| {
            cpu::with_data::<T, _>(out, |o| {
                cpu::with_data::<T, _>(grad, |go| {
                    Ok((0..d.bh * groups)
                        .into_par_iter()
                        .map_init(
                            || (vec![T::zero(); d.chunk * d.k_len], vec![T::zero(); d.chunk * d.k_len]),
                            |(p_buf, dp_buf), task| {
                                let (bh, g) = (task / groups, task % groups);
                                let mut dk = vec![T::zero(); d.k_len * d.dim];
                                let mut dv = vec![T::zero(); d.k_len * d.v_dim];
                                let first = g * per_group;
                                for c in first..(first + per_group).min(d.chunks()) {
                                    let row0 = c * d.chunk;
                                    let rows = d.chunk.min(d.q_len - row0);
                                    let o_at = d.token_major(bh, row0, d.q_len, d.v_dim);
                                    let go_c = Mat { data: go, offset: o_at, rs: o_rs, cs: 1 };
                                    let p = &mut p_buf[..rows * d.k_len];
                                    let dp = &mut dp_buf[..rows * d.k_len];
                                    scores(p, &q, &k, mask.as_ref(), &d, bh, row0, rows, scale);
                                    cpu::gemm((rows, d.k_len, d.v_dim), dp, 0, d.k_len, false, go_c, v.rows(bh, 0).t(), T::one(), 1);
                                    let lse_c = &lse[bh * d.q_len + row0..][..rows];
                                    score_grads(p, dp, d.k_len, lse_c, &go[o_at..], &o[o_at..], d.v_dim, o_rs);
                                    // dv += Pᵀ·dO, dq = scale·dS·K, dk += scale·dSᵀ·Q.
                                    cpu::gemm((d.k_len, d.v_dim, rows), &mut dv, 0, d.v_dim, true, Mat::rows(p, 0, d.k_len).t(), go_c, T::one(), 1);
                                    let q_at = d.token_major(bh, row0, d.q_len, d.dim);
                                    // SAFETY: each chunk's dq rows are written by one task only.
                                    unsafe { cpu::gemm_shared((rows, d.dim, d.k_len), &dq_w, q_at, q_rs, false, Mat::rows(dp, 0, d.k_len), k.rows(bh, 0), scale, 1) };
                                    cpu::gemm((d.k_len, d.dim, rows), &mut dk, 0, d.dim, true, Mat::rows(dp, 0, d.k_len).t(), q.rows(bh, row0), scale, 1);
                                }
                                (dk, dv)
                            },
                        )
                        .collect())
                })
            })
        })?;

        let mut dk = vec![T::zero(); d.bh * d.k_len * d.dim];
        let mut dv = vec![T::zero(); d.bh * d.k_len * d.v_dim];
        for (task, (pk, pv)) in parts.iter().enumerate() {
            let bh = task / groups;
            for j in 0..d.k_len {
                let add = |dst: &mut [T], src: &[T]| dst.iter_mut().zip(src).for_each(|(a, &b)| *a += b);
                add(&mut dk[d.token_major(bh, j, d.k_len, d.dim)..][..d.dim], &pk[j * d.dim..][..d.dim]);
                add(&mut dv[d.token_major(bh, j, d.k_len, d.v_dim)..][..d.v_dim], &pv[j * d.v_dim..][..d.v_dim]);
            }
        }
        let [b, h] = [qt.dims()[0], qt.dims()[1]];
        // Returned as [batch, heads, len, width] views of the token-major buffers.
        Ok((
            cpu::tensor(dq, &Shape::from((b, d.q_len, h, d.dim)))?.transpose(1, 2)?,
            cpu::tensor(dk, &Shape::from((b, d.k_len, h, d.dim)))?.transpose(1, 2)?,
            cpu::tensor(dv, &Shape::from((b, d.k_len, h, d.v_dim)))?.transpose(1, 2)?,
        ))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "sdserve-attention"
    }

    fn cpu_fwd(&self, qs: &CpuStorage, ql: &Layout, ks: &CpuStorage, kl: &Layout, vs: &CpuStorage, vl: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = Dims::new(ql, kl, vl, self.max_chunk)?;
        let out = by_dtype!(qs.dtype(), self.forward(qs, ql, ks, kl, vs, vl))?;
        Ok((out, Shape::from((ql.dims()[0], d.q_len, ql.dims()[1], d.v_dim))))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = by_dtype!(q.dtype(), self.backward(q, k, v, out, grad))?;
        let keep = |t: &Tensor, g: Tensor| t.track_op().then_some(g);
        Ok((keep(q, dq), keep(k, dk), keep(v, dv)))
    }
}

/// `softmax(q·kᵀ/√d + mask)·v` over `[batch, heads, seq, dim]` f32/f64 CPU tensors (any
/// strides); `mask` is constant and broadcastable to `[batch, heads, q_len, k_len]`. The
/// result is a `[batch, heads, q_len, v_dim]` view of a token-major buffer, so
/// `transpose(1, 2)` and merging the heads cost no copy.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    chunked(q, k, v, mask, MAX_CHUNK)
}

fn chunked(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, max_chunk: usize) -> Result<Tensor> {
    let (b, h, q_len, dim) = q.dims4()?;
    let k_len = k.dim(2)?;
    let mask = match mask {
        Some(m) => Some(m.to_dtype(q.dtype())?.broadcast_as((b, h, q_len, k_len))?),
        None => None,
    };
    let op = Attention { scale: 1.0 / (dim as f64).sqrt(), mask, lse: Mutex::new(None), max_chunk };
    // The op's output is token-major `[batch, q_len, heads, v_dim]`.
    q.apply_op3(k, v, op)?.transpose(1, 2)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::*;

    fn randn(seed: u64, shape: &[usize]) -> Tensor {
        crate::noise::NoiseRng::new(seed).randn(shape, DType::F64, &Device::Cpu).unwrap()
    }

    /// Several chunks per head, and one head split into groups of chunks in the backward
    /// pass, give the same output and gradients as one chunk.
    #[test]
    fn chunking_does_not_change_results() {
        for bh in [1, 3] {
            let [q, k, v] = [1, 2, 3].map(|s| Var::from_tensor(&randn(s, &[1, bh, 11, 4])).unwrap());
            let r = randn(4, &[1, bh, 11, 4]);
            let run = |chunk| {
                let out = chunked(q.as_tensor(), k.as_tensor(), v.as_tensor(), None, chunk).unwrap();
                let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let g = [&q, &k, &v].map(|t| grads.get(t).unwrap().clone());
                (out, g)
            };
            let (one, g1) = run(MAX_CHUNK);
            let (many, g4) = run(4);
            let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(diff(&one, &many) < 1e-14);
            for (a, b) in g1.iter().zip(&g4) {
                assert!(diff(a, b) < 1e-14, "bh {bh}: {}", diff(a, b));
            }
        }
    }
}
