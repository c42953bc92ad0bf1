//! 2-D convolution (NCHW, square kernel, symmetric padding, any stride) through GEMM, with a
//! backward pass that computes only the gradients of the inputs that carry one.
//!
//! Forward: the output is computed in tiles of output rows; each tile's input patches are
//! gathered into a `[C_in·k·k, pixels]` buffer (row copies, padding as zeros) and multiplied
//! by the kernel seen as a `[C_out, C_in·k·k]` matrix. Input gradient: for stride 1, the
//! forward kernel applied to the output gradient with the flipped, transposed kernel; for
//! other strides, `Wᵀ·dy` per tile scattered back onto the input (col2im). Kernel gradient:
//! `dy·colsᵀ` accumulated over the tiles.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{self, by_dtype, Float, Mat, SharedMut};

/// Output pixels per tile.
const TILE_PIXELS: usize = 512;

/// Geometry of one convolution.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

impl Geometry {
    fn new(x: &[usize], w: &[usize], stride: usize, padding: usize) -> Result<Self> {
        if x.len() != 4 || w.len() != 4 || w[1] != x[1] || w[2] != w[3] || stride == 0 || x[2] + 2 * padding < w[2] || x[3] + 2 * padding < w[3] {
            candle_core::bail!("conv kernel: input {x:?} does not fit kernel {w:?} (stride {stride}, padding {padding})");
        }
        Ok(Self { batch: x[0], c_in: x[1], h: x[2], w: x[3], c_out: w[0], k: w[2], stride, padding })
    }

    fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.k) / self.stride + 1
    }

    fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.k) / self.stride + 1
    }

    /// Rows of the patch matrix: `C_in·k·k`.
    fn patch(&self) -> usize {
        self.c_in * self.k * self.k
    }

    fn in_plane(&self) -> usize {
        self.h * self.w
    }

    fn out_plane(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// A plain matrix product: 1×1 kernel, stride 1, no padding.
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }

    /// Output rows per tile, and the number of tiles per image.
    fn tiles(&self) -> (usize, usize) {
        let rows = (TILE_PIXELS / self.out_w()).clamp(1, self.out_h());
        (rows, self.out_h().div_ceil(rows))
    }
}

/// Gathers the input patches of output rows `y0..y0 + rows` of one image `x` (`[C_in, H, W]`)
/// into `col` (`[C_in·k·k, rows·out_w]`).
fn im2col<T: Float>(x: &[T], g: &Geometry, y0: usize, rows: usize, col: &mut [T]) {
    let (ow, n) = (g.out_w(), rows * g.out_w());
    let (s, p) = (g.stride, g.padding as isize);
    for ci in 0..g.c_in {
        let plane = &x[ci * g.in_plane()..(ci + 1) * g.in_plane()];
        for a in 0..g.k {
            for b in 0..g.k {
                let r = (ci * g.k + a) * g.k + b;
                let dst = &mut col[r * n..(r + 1) * n];
                // Output columns whose input column `x·s + b − p` lies inside the image.
                let x_lo = ((p - b as isize).max(0) as usize).div_ceil(s).min(ow);
                let x_hi = (((g.w as isize - 1 + p - b as isize) / s as isize + 1).max(0) as usize).clamp(x_lo, ow);
                for (yy, row) in dst.chunks_exact_mut(ow).enumerate() {
                    let iy = ((y0 + yy) * s + a) as isize - p;
                    if iy < 0 || iy >= g.h as isize {
                        row.fill(T::zero());
                        continue;
                    }
                    row[..x_lo].fill(T::zero());
                    row[x_hi..].fill(T::zero());
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    let ix0 = (x_lo * s + b) as isize - p;
                    if s == 1 {
                        row[x_lo..x_hi].copy_from_slice(&src[ix0 as usize..ix0 as usize + (x_hi - x_lo)]);
                    } else {
                        for (j, v) in row[x_lo..x_hi].iter_mut().enumerate() {
                            *v = src[ix0 as usize + j * s];
                        }
                    }
                }
            }
        }
    }
}

/// Adds the patch-matrix gradient `col` of output rows `y0..y0 + rows` back onto the input
/// gradient planes `dx` (`[C_in, H, W]`), in parallel over input channels.
fn col2im<T: Float>(col: &[T], g: &Geometry, y0: usize, rows: usize, dx: &mut [T]) {
    let (ow, n) = (g.out_w(), rows * g.out_w());
    let (s, p) = (g.stride, g.padding as isize);
    dx.par_chunks_mut(g.in_plane()).enumerate().for_each(|(ci, plane)| {
        for a in 0..g.k {
            for b in 0..g.k {
                let r = (ci * g.k + a) * g.k + b;
                let src = &col[r * n..(r + 1) * n];
                for (yy, row) in src.chunks_exact(ow).enumerate() {
                    let iy = ((y0 + yy) * s + a) as isize - p;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    for (x, &v) in row.iter().enumerate() {
                        let ix = (x * s + b) as isize - p;
                        if ix >= 0 && (ix as usize) < g.w {
                            dst[ix as usize] += v;
                        }
                    }
                }
            }
        }
    });
}

/// Convolves contiguous `x` (`[B, C_in, H, W]`) with contiguous `w` (`[C_out, C_in, k, k]`).
fn forward<T: Float>(x: &[T], w: &[T], bias: Option<&[T]>, g: &Geometry) -> Vec<T> {
    let (plane, patch) = (g.out_plane(), g.patch());
    let mut y = vec![T::zero(); g.batch * g.c_out * plane];
    let kernel = Mat::rows(w, 0, patch);
    if g.pointwise() {
        for (b, yb) in y.chunks_exact_mut(g.c_out * plane).enumerate() {
            let xb = Mat::rows(x, b * g.c_in * g.in_plane(), g.in_plane());
            cpu::gemm((g.c_out, plane, g.c_in), yb, 0, plane, false, kernel, xb, T::one(), cpu::threads());
        }
    } else {
        let (rows, tiles) = g.tiles();
        let tasks = g.batch * tiles;
        // Enough tiles: one per thread at a time; else each tile's GEMM uses every thread.
        let (outer, inner) = if tasks >= 2 * cpu::threads() { (true, 1) } else { (false, cpu::threads()) };
        let y_w = SharedMut::new(&mut y);
        let run = |col: &mut Vec<T>, task: usize| {
            let (b, t) = (task / tiles, task % tiles);
            let y0 = t * rows;
            let n = rows.min(g.out_h() - y0) * g.out_w();
            col.resize(patch * n, T::zero());
            im2col(&x[b * g.c_in * g.in_plane()..(b + 1) * g.c_in * g.in_plane()], g, y0, n / g.out_w(), col);
            let dst = b * g.c_out * plane + y0 * g.out_w();
            // SAFETY: the tiles cover disjoint column ranges of each image's output rows.
            unsafe { cpu::gemm_shared((g.c_out, n, patch), &y_w, dst, plane, false, kernel, Mat::rows(col, 0, n), T::one(), inner) };
        };
        if outer {
            (0..tasks).into_par_iter().for_each_init(Vec::new, run);
        } else {
            let mut col = Vec::new();
            (0..tasks).for_each(|t| run(&mut col, t));
        }
    }
    if let Some(bias) = bias {
        y.par_chunks_mut(plane).enumerate().for_each(|(i, ch)| {
            let b = bias[i % g.c_out];
            ch.iter_mut().for_each(|v| *v += b);
        });
    }
    y
}

/// The kernel of the stride-1 input gradient: `W'[ci, co, a, b] = W[co, ci, k−1−a, k−1−b]`.
fn flipped<T: Float>(w: &[T], g: &Geometry) -> Vec<T> {
    let k2 = g.k * g.k;
    let mut out = vec![T::zero(); w.len()];
    for co in 0..g.c_out {
        for ci in 0..g.c_in {
            let src = &w[(co * g.c_in + ci) * k2..][..k2];
            let dst = &mut out[(ci * g.c_out + co) * k2..][..k2];
            for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                *d = *s;
            }
        }
    }
    out
}

/// Gradient of the input `x` from the output gradient `dy`.
fn input_grad<T: Float>(dy: &[T], w: &[T], g: &Geometry) -> Vec<T> {
    if g.pointwise() {
        let mut dx = vec![T::zero(); g.batch * g.c_in * g.in_plane()];
        let plane = g.in_plane();
        for (b, dxb) in dx.chunks_exact_mut(g.c_in * plane).enumerate() {
            let dyb = Mat::rows(dy, b * g.c_out * plane, plane);
            cpu::gemm((g.c_in, plane, g.c_out), dxb, 0, plane, false, Mat::rows(w, 0, g.c_in).t(), dyb, T::one(), cpu::threads());
        }
        return dx;
    }
    if g.stride == 1 && g.padding < g.k {
        let back = Geometry { c_in: g.c_out, c_out: g.c_in, h: g.out_h(), w: g.out_w(), padding: g.k - 1 - g.padding, ..*g };
        return forward(dy, &flipped(w, g), None, &back);
    }
    let (rows, tiles) = g.tiles();
    let (plane, patch) = (g.out_plane(), g.patch());
    let mut dx = vec![T::zero(); g.batch * g.c_in * g.in_plane()];
    let mut col = Vec::new();
    for (b, dxb) in dx.chunks_exact_mut(g.c_in * g.in_plane()).enumerate() {
        for t in 0..tiles {
            let y0 = t * rows;
            let n = rows.min(g.out_h() - y0) * g.out_w();
            col.resize(patch * n, T::zero());
            let dyb = Mat::rows(dy, b * g.c_out * plane + y0 * g.out_w(), plane);
            cpu::gemm((patch, n, g.c_out), &mut col, 0, n, false, Mat::rows(w, 0, patch).t(), dyb, T::one(), cpu::threads());
            col2im(&col, g, y0, n / g.out_w(), dxb);
        }
    }
    dx
}

/// Gradient of the kernel: `Σ dy·colsᵀ` over images and tiles.
fn kernel_grad<T: Float>(x: &[T], dy: &[T], g: &Geometry) -> Vec<T> {
    let (plane, patch) = (g.out_plane(), g.patch());
    let (rows, tiles) = g.tiles();
    let zeros = || vec![T::zero(); g.c_out * patch];
    (0..g.batch * tiles)
        .into_par_iter()
        .fold(
            || (zeros(), Vec::new()),
            |(mut dw, mut col), task| {
                let (b, t) = (task / tiles, task % tiles);
                let y0 = t * rows;
                let n = rows.min(g.out_h() - y0) * g.out_w();
                col.resize(patch * n, T::zero());
                im2col(&x[b * g.c_in * g.in_plane()..(b + 1) * g.c_in * g.in_plane()], g, y0, n / g.out_w(), &mut col);
                let dyb = Mat::rows(dy, b * g.c_out * plane + y0 * g.out_w(), plane);
                cpu::gemm((g.c_out, patch, n), &mut dw, 0, patch, true, dyb, Mat::rows(&col, 0, n).t(), T::one(), 1);
                (dw, col)
            },
        )
        .map(|(dw, _)| dw)
        .reduce(zeros, |mut a, b| {
            a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
            a
        })
}

/// Gradient of the bias: `dy` summed over images and pixels.
fn bias_grad<T: Float>(dy: &[T], g: &Geometry) -> Vec<T> {
    let mut db = vec![T::zero(); g.c_out];
    for (i, ch) in dy.chunks_exact(g.out_plane()).enumerate() {
        db[i % g.c_out] += ch.iter().copied().sum::<T>();
    }
    db
}

/// The convolution op over `(x, weight)` or `(x, weight, bias)`.
struct Conv2d {
    stride: usize,
    padding: usize,
}

impl Conv2d {
    fn fwd<T: Float>(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bias: Option<(&CpuStorage, &Layout)>) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(xl.dims(), wl.dims(), self.stride, self.padding)?;
        let (x, w) = (cpu::contiguous::<T>(xs, xl)?, cpu::contiguous::<T>(ws, wl)?);
        let b = match bias {
            Some((bs, bl)) => Some(cpu::contiguous::<T>(bs, bl)?),
            None => None,
        };
        let y = forward(&x, &w, b.as_deref(), &g);
        Ok((T::to_cpu_storage_owned(y), Shape::from((g.batch, g.c_out, g.out_h(), g.out_w()))))
    }

    /// Gradients of `x`, `w` and `b`, each only when that input tracks a gradient.
    fn bwd_t<T: Float>(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, dy: &Tensor) -> Result<[Option<Tensor>; 3]> {
        let g = Geometry::new(x.dims(), w.dims(), self.stride, self.padding)?;
        cpu::with_data::<T, _>(dy, |dyd| {
            let dx = match x.track_op() {
                true => Some(cpu::with_data::<T, _>(w, |wd| cpu::tensor(input_grad(dyd, wd, &g), x.shape()))?),
                false => None,
            };
            let dw = match w.track_op() {
                true => Some(cpu::with_data::<T, _>(x, |xd| cpu::tensor(kernel_grad(xd, dyd, &g), w.shape()))?),
                false => None,
            };
            let db = match b.filter(|b| b.track_op()) {
                Some(b) => Some(cpu::tensor(bias_grad(dyd, &g), b.shape())?),
                None => None,
            };
            Ok([dx, dw, db])
        })
    }
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "sdserve-conv2d"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs.dtype(), self.fwd(xs, xl, ws, wl, None))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, _] = by_dtype!(x.dtype(), self.bwd_t(x, w, None, dy))?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "sdserve-conv2d-bias"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs.dtype(), self.fwd(xs, xl, ws, wl, Some((bs, bl))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, db] = by_dtype!(x.dtype(), self.bwd_t(x, w, Some(b), dy))?;
        Ok((dx, dw, db))
    }
}

/// 2-D convolution of an f32/f64 CPU tensor `[B, C_in, H, W]` with a square kernel
/// `[C_out, C_in, k, k]`, symmetric zero padding and the given stride, plus `bias`.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let op = Conv2d { stride, padding };
    match bias {
        Some(b) => x.apply_op3(weight, b, op),
        None => x.apply_op2(weight, op),
    }
}
