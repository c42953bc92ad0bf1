//! What the CPU kernels share: the float types they run on, access to tensor data, a strided
//! GEMM and vectorised row primitives (exp, max, sum).

use std::borrow::Cow;

use candle_core::{bail, CpuStorage, Device, Layout, Result, Shape, Storage, Tensor, WithDType};
use gemm::Parallelism;

/// The element types the kernels run on (f32 and f64).
pub trait Float: WithDType + num_traits::Float + std::iter::Sum + Send + Sync {
    /// `e^x`; for f32 a branch-free polynomial that the compiler vectorises (≤ 2 ulp).
    fn exp_fast(self) -> Self;

    /// `erf(x)`; for f32 a rational approximation that the compiler vectorises (relative
    /// error < 5e-7).
    fn erf_fast(self) -> Self;

    /// The value as f64.
    #[inline(always)]
    fn wide(self) -> f64 {
        WithDType::to_f64(self)
    }
}

impl Float for f64 {
    #[inline(always)]
    fn exp_fast(self) -> f64 {
        self.exp()
    }

    #[inline(always)]
    fn erf_fast(self) -> f64 {
        libm::erf(self)
    }
}

impl Float for f32 {
    /// Cephes `expf`: `x = n·ln2 + r`, a degree-6 polynomial in `r`, scaled by `2^n` through
    /// the exponent bits; 0 below the smallest normal result.
    #[inline(always)]
    fn exp_fast(self) -> f32 {
        const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
        let x = if self > 88.376_26 { 88.376_26 } else { self }; // NaN stays NaN
        let t = x.mul_add(std::f32::consts::LOG2_E, MAGIC);
        let n = t - MAGIC;
        let r = n.mul_add(-0.693_359_4, x);
        let r = n.mul_add(2.121_944_4e-4, r);
        let mut p = 1.987_569_1e-4f32;
        p = p.mul_add(r, 1.398_199_9e-3);
        p = p.mul_add(r, 8.333_452e-3);
        p = p.mul_add(r, 4.166_579_6e-2);
        p = p.mul_add(r, 0.166_666_65);
        p = p.mul_add(r, 0.5);
        p = p.mul_add(r * r, r) + 1.0;
        let bits = (t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127)) << 23;
        let y = p * f32::from_bits(bits);
        if x < -87.336_55 {
            0.0
        } else {
            y
        }
    }

    /// Eigen's `generic_fast_erf_float`: `x·P(x²)/Q(x²)` on `[-4, 4]`, ±1 beyond.
    #[inline(always)]
    fn erf_fast(self) -> f32 {
        let x = self.clamp(-4.0, 4.0);
        let x2 = x * x;
        let mut p = x2.mul_add(-2.726_142_3e-10, 2.770_681_4e-8);
        p = p.mul_add(x2, -2.101_024e-6);
        p = p.mul_add(x2, -5.692_506_4e-5);
        p = p.mul_add(x2, -7.349_906_3e-4);
        p = p.mul_add(x2, -2.954_6e-3);
        p = p.mul_add(x2, -1.609_603_3e-2);
        let mut q = x2.mul_add(-1.456_607_2e-5, -2.133_740_6e-4);
        q = q.mul_add(x2, -1.682_827e-3);
        q = q.mul_add(x2, -7.373_329_2e-3);
        q = q.mul_add(x2, -1.426_474e-2);
        x * p / q
    }
}

/// Defines `$name`, which runs the `#[inline(always)]` generic kernel `$imp` compiled for
/// AVX2 + FMA when the CPU has them (chosen at run time), else for the build's baseline.
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<T: Float>($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? = $imp:ident;) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<T: Float>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<T: Float>($($arg: $ty),*) $(-> $ret)? {
                    $imp::<T>($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2::<T>($($arg),*) };
                }
            }
            $imp::<T>($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// Number of threads the kernels split work over (candle's / rayon's setting).
pub fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// The contiguous data of one storage/layout pair, copied only when strided.
pub fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<Cow<'a, [T]>> {
    let data = s.as_slice::<T>()?;
    Ok(match l.contiguous_offsets() {
        Some((a, b)) => Cow::Borrowed(&data[a..b]),
        None => Cow::Owned(strided_copy(data, l)),
    })
}

fn strided_copy<T: Copy>(data: &[T], l: &Layout) -> Vec<T> {
    let (dims, strides) = (l.dims(), l.stride());
    let n = l.shape().elem_count();
    let mut out = Vec::with_capacity(n);
    let mut index = vec![0usize; dims.len()];
    let mut offset = l.start_offset();
    for _ in 0..n {
        out.push(data[offset]);
        for d in (0..dims.len()).rev() {
            index[d] += 1;
            offset += strides[d];
            if index[d] < dims[d] {
                break;
            }
            offset -= strides[d] * dims[d];
            index[d] = 0;
        }
    }
    out
}

/// The whole data buffer of a CPU storage (index it with the tensor's layout).
pub fn storage_slice<T: WithDType>(s: &Storage) -> Result<&[T]> {
    match s {
        Storage::Cpu(c) => c.as_slice::<T>(),
        _ => bail!("cpu kernel called on a non-cpu tensor"),
    }
}

/// Runs `f` on the contiguous CPU data of `t`.
pub fn with_data<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(&contiguous::<T>(c, l)?),
        _ => bail!("cpu kernel called on a non-cpu tensor"),
    }
}

/// A CPU tensor of `shape` holding `data`.
pub fn tensor<T: WithDType>(data: Vec<T>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// Calls the generic function `$f` (or method `$recv.$f`) instantiated for the dtype
/// `$dtype` (f32 or f64).
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F64 => $f::<f64>($($arg),*),
            d => candle_core::bail!("cpu kernel: unsupported dtype {d:?}"),
        }
    };
    ($dtype:expr, $recv:ident . $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            candle_core::DType::F32 => $recv.$f::<f32>($($arg),*),
            candle_core::DType::F64 => $recv.$f::<f64>($($arg),*),
            d => candle_core::bail!("cpu kernel: unsupported dtype {d:?}"),
        }
    };
}
pub(crate) use by_dtype;

/// A read-only strided matrix: element `(i, j)` is `data[offset + i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub offset: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major matrix with `cols` columns starting at `offset`.
    pub fn rows(data: &'a [T], offset: usize, cols: usize) -> Self {
        Self { data, offset, rs: cols, cs: 1 }
    }

    /// The transpose view.
    pub fn t(self) -> Self {
        Self { rs: self.cs, cs: self.rs, ..self }
    }

    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = self.offset + (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "gemm operand out of bounds");
        }
    }
}

/// `dst[m×n] (+)= alpha · lhs[m×k] · rhs[k×n]`, `dst` row-major with row stride `dst_rs`
/// from `dst_offset`; accumulates into `dst` when `accumulate`.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Float>(
    dims: (usize, usize, usize),
    dst: &mut [T],
    dst_offset: usize,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    alpha: T,
    threads: usize,
) {
    // SAFETY: `dst` is borrowed mutably for the whole call.
    unsafe { gemm_shared(dims, &SharedMut::new(dst), dst_offset, dst_rs, accumulate, lhs, rhs, alpha, threads) }
}

/// [`gemm`] into a buffer shared between tasks.
///
/// # Safety
/// No other thread may access the `m×n` destination elements during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_shared<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: &SharedMut<T>,
    dst_offset: usize,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    alpha: T,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    lhs.check(m, k);
    rhs.check(k, n);
    assert!(dst_offset + (m - 1) * dst_rs + n <= dst.1, "gemm destination out of bounds");
    let par = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: every index the call reads or writes was bounds-checked above.
    gemm::gemm(
        m,
        n,
        k,
        dst.0.add(dst_offset),
        1,
        dst_rs as isize,
        accumulate,
        lhs.data.as_ptr().add(lhs.offset),
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.data.as_ptr().add(rhs.offset),
        rhs.cs as isize,
        rhs.rs as isize,
        T::one(),
        alpha,
        false,
        false,
        false,
        par,
    )
}

/// A pointer that lets parallel tasks write disjoint parts of one buffer.
pub struct SharedMut<T>(*mut T, usize);

// SAFETY: users only access disjoint index sets from different threads.
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub fn new(data: &mut [T]) -> Self {
        Self(data.as_mut_ptr(), data.len())
    }

    /// # Safety
    /// No two threads may access overlapping ranges at the same time, and the buffer must
    /// outlive the returned slice.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.1, "shared slice out of bounds");
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// Maximum of a row.
#[inline(always)]
pub fn max<T: Float>(xs: &[T]) -> T {
    let mut m = [T::neg_infinity(); 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let mut best = tail.iter().fold(T::neg_infinity(), |a, &b| if b > a { b } else { a });
    for v in m {
        best = if v > best { v } else { best };
    }
    best
}

/// Dot product of two rows, accumulated in eight lanes.
#[inline(always)]
pub fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut s = [T::zero(); 8];
    let ca = a.chunks_exact(8);
    let ta = ca.remainder();
    let cb = b.chunks_exact(8);
    let tb = cb.remainder();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            s[i] += x[i] * y[i];
        }
    }
    ta.iter().zip(tb).fold(s.iter().copied().sum::<T>(), |acc, (&x, &y)| acc + x * y)
}

/// `x ← e^(x − shift)` over a row; returns the sum of the results.
#[inline(always)]
pub fn exp_shifted<T: Float>(xs: &mut [T], shift: T) -> T {
    let mut s = [T::zero(); 8];
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        for i in 0..8 {
            c[i] = (c[i] - shift).exp_fast();
            s[i] += c[i];
        }
    }
    let mut total = s.iter().copied().sum::<T>();
    for v in chunks.into_remainder() {
        *v = (*v - shift).exp_fast();
        total += *v;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(always)]
    fn exp_one<T: Float>(x: T) -> T {
        x.exp_fast()
    }

    simd_dispatch! { fn exp_avx2<T: Float>(x: T) -> T = exp_one; }

    #[inline(always)]
    fn erf_one<T: Float>(x: T) -> T {
        x.erf_fast()
    }

    simd_dispatch! { fn erf_avx2<T: Float>(x: T) -> T = erf_one; }

    #[test]
    fn erf_fast_is_close_to_libm() {
        let mut worst = 0f64;
        for i in -600_000..=600_000 {
            let x = i as f32 * 1e-5;
            let exact = libm::erf(x as f64);
            worst = worst.max((erf_avx2(x) as f64 - exact).abs() / exact.abs().max(1e-3));
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
        assert!((erf_avx2(10f32) - 1.0).abs() <= f32::EPSILON);
        assert!((erf_avx2(-10f32) + 1.0).abs() <= f32::EPSILON);
    }

    #[test]
    fn exp_fast_is_within_two_ulp_of_std() {
        // Normal results only: below e^-87.3 the kernel flushes to zero.
        let mut worst = (0u32, 0f32);
        for i in -1_984_000..=2_000_000 {
            let x = i as f32 * 4.4e-5;
            let (a, b) = (exp_avx2(x), x.exp());
            let ulp = a.to_bits().abs_diff(b.to_bits());
            if ulp > worst.0 {
                worst = (ulp, x);
            }
        }
        assert!(worst.0 <= 2, "worst error {} ulp at {}", worst.0, worst.1);
        assert_eq!(f32::NEG_INFINITY.exp_fast(), 0.0);
        assert_eq!((-100f32).exp_fast(), 0.0);
        assert!(f32::NAN.exp_fast().is_nan());
        assert!((88.0f32.exp_fast() / 88.0f32.exp() - 1.0).abs() < 1e-6);
    }
}
