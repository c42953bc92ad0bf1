//! Sinusoidal timestep features and the timestep MLP (diffusers `Timesteps` /
//! `TimestepEmbedding`).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::lora::LoraSet;
use crate::model::nn::Linear;

/// `get_timestep_embedding` for one timestep repeated `batch` times, computed in f32 exactly
/// as diffusers does before casting to `dtype`.
pub fn timestep_features(
    t: f64,
    batch: usize,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let ln = (10000f64).ln() as f32;
    let args: Vec<f32> = (0..half)
        .map(|i| (-ln * i as f32 / (half as f32 - freq_shift as f32)).exp() * t as f32)
        .collect();
    let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
    let mut row = if flip_sin_to_cos { [cos, sin].concat() } else { [sin, cos].concat() };
    row.resize(dim, 0.0);
    Tensor::from_vec(row, (1, dim), device)?.repeat((batch, 1))?.to_dtype(dtype)
}

/// `linear_1 → SiLU → linear_2`.
#[derive(Clone, Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, time_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), in_dim, time_dim, true)?,
            linear_2: Linear::new(vb.pp("linear_2"), time_dim, time_dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor, lora: &LoraSet) -> Result<Tensor> {
        let h = self.linear_1.forward(x, lora)?.silu()?;
        self.linear_2.forward(&h, lora)
    }
}
