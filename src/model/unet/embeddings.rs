//! Sinusoidal timestep features and the timestep MLP (diffusers `Timesteps` /
//! `TimestepEmbedding`), and SDXL's added text/time embedding.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::conditioning::AddedConditions;
use crate::lora::LoraSet;
use crate::model::nn::Linear;

/// `get_timestep_embedding` for one timestep per batch item, computed in f32 exactly as
/// diffusers does before casting to `dtype`.
pub fn timestep_features(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let ln = (10000f64).ln() as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (-ln * i as f32 / (half as f32 - freq_shift as f32)).exp()).collect();
    let mut rows = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let (sin, cos): (Vec<f32>, Vec<f32>) = freqs.iter().map(|f| ((f * t as f32).sin(), (f * t as f32).cos())).unzip();
        let mut row = if flip_sin_to_cos { [cos, sin].concat() } else { [sin, cos].concat() };
        row.resize(dim, 0.0);
        rows.extend(row);
    }
    Tensor::from_vec(rows, (timesteps.len(), dim), device)?.to_dtype(dtype)
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

/// SDXL's `addition_embed_type: "text_time"`: sinusoidal features of each time id
/// (`add_time_proj`) appended to the pooled text embedding, through `add_embedding`.
#[derive(Clone, Debug)]
pub struct TextTimeEmbedding {
    add_embedding: TimestepEmbedding,
    time_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
}

impl TextTimeEmbedding {
    /// `vb` is the UNet root (the module is `add_embedding`).
    pub fn new(vb: VarBuilder, time_dim: usize, input_dim: usize, out_dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Result<Self> {
        Ok(Self { add_embedding: TimestepEmbedding::new(vb.pp("add_embedding"), input_dim, out_dim)?, time_dim, flip_sin_to_cos, freq_shift })
    }

    /// The embedding added to the timestep embedding, `[B, out_dim]`, computed in `dtype`.
    pub fn forward(&self, added: &AddedConditions, dtype: DType, lora: &LoraSet) -> Result<Tensor> {
        let text = added.text_embeds.to_dtype(dtype)?;
        let ids = added.time_ids.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let features = timestep_features(&ids, self.time_dim, self.flip_sin_to_cos, self.freq_shift, dtype, text.device())?;
        let features = features.reshape((text.dim(0)?, ()))?;
        self.add_embedding.forward(&Tensor::cat(&[&text, &features], 1)?, lora)
    }
}
