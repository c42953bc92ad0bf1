//! `DDIMScheduler`: deterministic (eta = 0) or stochastic DDIM updates.

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::schedule::{alphas_cumprod, spaced_timesteps};
use super::Scheduler;
use crate::noise::NoiseRng;
use crate::model::config::SchedulerConfig;

/// What the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

impl Prediction {
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        Ok(match cfg.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            "sample" => Prediction::Sample,
            other => bail!("unsupported prediction_type {other:?}"),
        })
    }
}

/// DDIM with a fixed number of steps. Its update is stateless, so [`Ddim::step_pure`] can be
/// re-run during the training backward pass.
#[derive(Clone, Debug)]
pub struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    step_ratio: usize,
    eta: f64,
    prediction: Prediction,
    clip_sample: Option<f64>,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, steps: usize, eta: f64) -> Result<Self> {
        if !(eta.is_finite() && eta >= 0.0) {
            bail!("eta must be >= 0, got {eta}");
        }
        if cfg.thresholding {
            bail!("dynamic thresholding is not supported");
        }
        let alphas_cumprod = alphas_cumprod(cfg)?;
        let mut timesteps = spaced_timesteps(cfg, steps)?;
        if cfg.timestep_spacing == "linspace" {
            timesteps.iter_mut().for_each(|t| *t = t.round_ties_even());
        }
        Ok(Self {
            final_alpha_cumprod: if cfg.set_alpha_to_one() { 1.0 } else { alphas_cumprod[0] },
            step_ratio: cfg.num_train_timesteps / steps,
            timesteps,
            alphas_cumprod,
            eta,
            prediction: Prediction::from_config(cfg)?,
            clip_sample: cfg.clip_sample().then_some(cfg.clip_sample_range),
        })
    }

    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// `(ᾱ_t, ᾱ_prev)` at step index `step`.
    pub fn alphas(&self, step: usize) -> (f64, f64) {
        let t = self.timesteps[step] as usize;
        let prev = t as isize - self.step_ratio as isize;
        let a_prev = if prev >= 0 { self.alphas_cumprod[prev as usize] } else { self.final_alpha_cumprod };
        (self.alphas_cumprod[t], a_prev)
    }

    /// The DDIM update from `sample` at step index `step`; `noise` is required when eta > 0.
    /// Only affine tensor ops are used, so it is differentiable in `model_output` and `sample`.
    pub fn step_pure(
        &self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (a_t, a_prev) = self.alphas(step);
        let b_t = 1.0 - a_t;
        let (mut x0, eps) = match self.prediction {
            Prediction::Epsilon => {
                let x0 = ((sample - (model_output * b_t.sqrt())?)? / a_t.sqrt())?;
                (x0, model_output.clone())
            }
            Prediction::VPrediction => {
                let x0 = ((sample * a_t.sqrt())? - (model_output * b_t.sqrt())?)?;
                let eps = ((model_output * a_t.sqrt())? + (sample * b_t.sqrt())?)?;
                (x0, eps)
            }
            Prediction::Sample => {
                let eps = ((sample - (model_output * a_t.sqrt())?)? / b_t.sqrt())?;
                (model_output.clone(), eps)
            }
        };
        if let Some(r) = self.clip_sample {
            x0 = x0.clamp(-r, r)?;
        }
        let variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev);
        let std = self.eta * variance.max(0.0).sqrt();
        let dir = (eps * (1.0 - a_prev - std * std).max(0.0).sqrt())?;
        let prev = ((x0 * a_prev.sqrt())? + dir)?;
        match (std > 0.0, noise) {
            (false, _) => Ok(prev),
            (true, Some(n)) => prev + (n * std)?,
            (true, None) => candle_core::bail!("DDIM with eta > 0 needs noise"),
        }
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _step: usize) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, rng: &mut NoiseRng) -> candle_core::Result<Tensor> {
        let noise = if self.eta > 0.0 { Some(rng.randn(sample.shape(), sample.dtype(), sample.device())?) } else { None };
        self.step_pure(model_output, step, sample, noise.as_ref())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        let a = self.alphas_cumprod[self.timesteps[step] as usize];
        (original * a.sqrt())? + (noise * (1.0 - a).sqrt())?
    }
}
