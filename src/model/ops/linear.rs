//! `y = x·Wᵀ + b` whose backward pass computes only the gradients of the inputs that carry
//! one: for a frozen weight just `dx = dy·W`, not the weight gradient candle's matmul
//! backward always computes (a GEMM as large as the forward, and a weight-sized tensor held
//! until the backward pass ends).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::cpu::{self, by_dtype, Float, Mat};

/// The linear op over `(x, weight)` or `(x, weight, bias)`.
struct Linear;

/// `x` `[..., in]` as rows, `w` `[out, in]`: returns `(rows, in, out)`.
fn sizes(xl: &Layout, wl: &Layout) -> Result<(usize, usize, usize)> {
    let (wd, xd) = (wl.dims(), xl.dims());
    let k = xd.last().copied().unwrap_or(0);
    if wd.len() != 2 || wd[1] != k {
        candle_core::bail!("linear kernel: input {xd:?} does not fit weight {wd:?}");
    }
    Ok((xl.shape().elem_count() / k.max(1), k, wd[0]))
}

fn out_shape(xl: &Layout, n: usize) -> Shape {
    let mut dims = xl.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Shape::from(dims)
}

fn forward<T: Float>(xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bias: Option<(&CpuStorage, &Layout)>) -> Result<CpuStorage> {
    let (m, k, n) = sizes(xl, wl)?;
    let x = cpu::contiguous::<T>(xs, xl)?;
    let w = ws.as_slice::<T>()?;
    let wt = Mat { data: w, offset: wl.start_offset(), rs: wl.stride()[1], cs: wl.stride()[0] };
    let mut y = vec![T::zero(); m * n];
    cpu::gemm((m, n, k), &mut y, 0, n, false, Mat::rows(&x, 0, k), wt, T::one(), cpu::threads());
    if let Some((bs, bl)) = bias {
        let b = cpu::contiguous::<T>(bs, bl)?;
        for row in y.chunks_exact_mut(n) {
            row.iter_mut().zip(b.iter()).for_each(|(y, &b)| *y += b);
        }
    }
    Ok(T::to_cpu_storage_owned(y))
}

/// Gradients of `x`, `w` and `b` (each only when that input tracks a gradient).
fn backward<T: Float>(x: &Tensor, w: &Tensor, b: Option<&Tensor>, g: &Tensor) -> Result<[Option<Tensor>; 3]> {
    let (m, k, n) = sizes(x.layout(), w.layout())?;
    cpu::with_data::<T, _>(g, |gd| {
        let dx = match x.track_op() {
            true => cpu::with_data::<T, _>(w, |wd| {
                let mut dx = vec![T::zero(); m * k];
                cpu::gemm((m, k, n), &mut dx, 0, k, false, Mat::rows(gd, 0, n), Mat::rows(wd, 0, k), T::one(), cpu::threads());
                cpu::tensor(dx, x.shape()).map(Some)
            })?,
            false => None,
        };
        let dw = match w.track_op() {
            true => cpu::with_data::<T, _>(x, |xd| {
                let mut dw = vec![T::zero(); n * k];
                cpu::gemm((n, k, m), &mut dw, 0, k, false, Mat::rows(gd, 0, n).t(), Mat::rows(xd, 0, k), T::one(), cpu::threads());
                cpu::tensor(dw, w.shape()).map(Some)
            })?,
            false => None,
        };
        let db = match b.filter(|b| b.track_op()) {
            Some(b) => {
                let mut db = vec![T::zero(); n];
                for row in gd.chunks_exact(n) {
                    db.iter_mut().zip(row).for_each(|(d, &g)| *d += g);
                }
                Some(cpu::tensor(db, b.shape())?)
            }
            None => None,
        };
        Ok([dx, dw, db])
    })
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "sdserve-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = by_dtype!(xs.dtype(), forward(xs, xl, ws, wl, None))?;
        Ok((y, out_shape(xl, wl.dims()[0])))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, _] = by_dtype!(x.dtype(), backward(x, w, None, g))?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "sdserve-linear-bias"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = by_dtype!(xs.dtype(), forward(xs, xl, ws, wl, Some((bs, bl))))?;
        Ok((y, out_shape(xl, wl.dims()[0])))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, db] = by_dtype!(x.dtype(), backward(x, w, Some(b), g))?;
        Ok((dx, dw, db))
    }
}

/// `x·Wᵀ (+ b)` over the last dimension of an f32/f64 CPU tensor.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => x.apply_op3(weight, b, Linear),
        None => x.apply_op2(weight, Linear),
    }
}
