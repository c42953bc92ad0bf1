//! DoRA (weight-decomposed low-rank adaptation): the adapted weight is rescaled to a learned
//! magnitude, `W' = m · (W + s·ΔW) / ‖W + s·ΔW‖`.
//!
//! The norm runs over each output row (peft / diffusers `lora_magnitude_vector`, LyCORIS
//! `dora_scale` of shape `[out, 1, …]`) or over each input channel (LyCORIS `dora_scale` of
//! shape `[1, in, …]`, trained with `wd_on_out=False`, as A1111 applies it). As in peft, the
//! request weight is part of `s` (inside the norm) while `m` stays as stored, and the norm
//! carries no gradient.

use candle_core::{DType, Result, Tensor};

use super::apply::Base;
use super::keys::Role;

/// The axis the weight's norm is taken along.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoraAxis {
    /// One magnitude per output row.
    Output,
    /// One magnitude per input channel.
    Input,
}

/// A module's DoRA magnitude.
#[derive(Clone, Debug)]
pub struct Dora {
    /// `[out]` or `[in]`, f32.
    pub magnitude: Tensor,
    pub axis: DoraAxis,
}

impl Dora {
    /// The axis a magnitude of `shape` (stored under `role`) decomposes a base weight of shape
    /// `base` along, if it fits. peft's `lora_magnitude_vector` is per output row (`[out]`,
    /// `[1, out, 1, 1]` for convolutions); LyCORIS's `dora_scale` is per output row when its
    /// first dimension is `out` and per input channel when it is `[1, in, …]` (the rule
    /// ComfyUI uses).
    pub fn axis(role: Role, shape: &[usize], base: &[usize]) -> Option<DoraAxis> {
        let (out, input) = (base[0], base[1]);
        let count: usize = shape.iter().product();
        let ones = |dims: &[usize]| dims.iter().all(|&d| d == 1);
        match (role, shape) {
            (Role::Magnitude, [n]) if *n == out => Some(DoraAxis::Output),
            (Role::Magnitude, [1, n, rest @ ..]) if *n == out && ones(rest) => Some(DoraAxis::Output),
            (Role::DoraScale, [n, rest @ ..]) if *n == out && count == out && ones(rest) => Some(DoraAxis::Output),
            (Role::DoraScale, [1, n, rest @ ..]) if *n == input && ones(rest) => Some(DoraAxis::Input),
            _ => None,
        }
    }

    /// What the decomposition adds to the base layer's output for `x`: `dense` is the
    /// update as a weight of the base weight's shape and `delta` gives the unscaled update's
    /// output for an input.
    pub fn output(
        &self,
        base: &Base,
        x: &Tensor,
        dense: &Tensor,
        scale: f64,
        delta: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let Base { layer, kernel, weight, wx } = *base;
        let merged = (weight.to_dtype(DType::F32)? + (dense * scale)?)?.detach();
        let rows = match self.axis {
            DoraAxis::Output => merged,
            DoraAxis::Input => merged.transpose(0, 1)?,
        };
        let norm = rows.flatten_from(1)?.sqr()?.sum(1)?.sqrt()?;
        let ratio = layer.channels(&(&self.magnitude / norm)?.to_dtype(x.dtype())?)?;
        match self.axis {
            // (m/n − 1) · Wx + (m/n) · s·Δx, peft's form
            DoraAxis::Output => wx.broadcast_mul(&(&ratio - 1.0)?)? + delta(x)?.broadcast_mul(&(ratio * scale)?)?,
            // W'x = (W + sΔW)(x ⊙ m/n)
            DoraAxis::Input => {
                let scaled = x.broadcast_mul(&ratio)?;
                (layer.run(kernel, &scaled, weight)? - wx)? + (delta(&scaled)? * scale)?
            }
        }
    }
}
