//! Fused CPU kernels for the models' hot ops, as candle custom ops with hand-written backward
//! passes that keep in the autograd graph only what the backward needs.
//!
//! The kernels run on f32 and f64 CPU tensors; [`model::nn`](super::nn) falls back to the
//! composed candle ops for other devices and dtypes, and everywhere inside
//! [`with_composed_ops`] (the reference the kernels are tested against).

mod cpu;

pub mod attention;
pub mod conv;
pub mod geglu;
pub mod linear;
pub mod norm;
pub mod softmax;

use std::cell::Cell;

use candle_core::{DType, Tensor};

thread_local! {
    static COMPOSED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the kernels switched off on this thread: every op is built from candle's
/// primitive ops, as on devices without kernels.
pub fn with_composed_ops<R>(f: impl FnOnce() -> R) -> R {
    let before = COMPOSED.replace(true);
    let out = f();
    COMPOSED.set(before);
    out
}

/// Whether the kernels can run on `t` (CPU, any float dtype; half precision is upcast).
pub fn kernels_for(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype().is_float() && !COMPOSED.get()
}

/// Whether the kernels can run on `t` in its own dtype (f32 or f64 on the CPU).
pub fn native(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64) && !COMPOSED.get()
}

/// The dtype a kernel computes `dtype` in: f32 and f64 as they are, half precision in f32.
pub fn kernel_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}
