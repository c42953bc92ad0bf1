//! `EulerAncestralDiscreteScheduler`: Euler steps in sigma space with fresh noise each step.

use anyhow::Result;
use candle_core::Tensor;

use super::ddim::Prediction;
use super::schedule::{interp, spaced_timesteps, train_sigmas};
use super::Scheduler;
use crate::engine::noise::NoiseRng;
use crate::model::config::SchedulerConfig;

#[derive(Clone, Debug)]
pub struct EulerAncestral {
    timesteps: Vec<f64>,
    /// One per timestep, then 0.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
}

impl EulerAncestral {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let train = train_sigmas(cfg)?;
        // diffusers keeps these timesteps in f32 (fractional under "linspace").
        let timesteps: Vec<f64> = spaced_timesteps(cfg, steps)?.into_iter().map(|t| t as f32 as f64).collect();
        let mut sig: Vec<f64> = timesteps.iter().map(|&t| interp(t, &train) as f32 as f64).collect();
        let max = sig.iter().cloned().fold(0.0, f64::max);
        sig.push(0.0);
        let init_noise_sigma = match cfg.timestep_spacing.as_str() {
            "linspace" | "trailing" => max,
            _ => (max * max + 1.0).sqrt(),
        };
        Ok(Self { timesteps, sigmas: sig, init_noise_sigma, prediction: Prediction::from_config(cfg)? })
    }

    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

impl Scheduler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        let s = self.sigmas[step];
        sample / (s * s + 1.0).sqrt()
    }

    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, rng: &mut NoiseRng) -> candle_core::Result<Tensor> {
        let (from, to) = (self.sigmas[step], self.sigmas[step + 1]);
        let x0 = match self.prediction {
            Prediction::Epsilon => (sample - (model_output * from)?)?,
            Prediction::VPrediction => {
                ((model_output * (-from / (from * from + 1.0).sqrt()))? + (sample / (from * from + 1.0))?)?
            }
            Prediction::Sample => model_output.clone(),
        };
        let up = (to * to * (from * from - to * to) / (from * from)).max(0.0).sqrt();
        let down = (to * to - up * up).max(0.0).sqrt();
        let derivative = ((sample - x0)? / from)?;
        let prev = (sample + (derivative * (down - from))?)?;
        if up == 0.0 {
            return Ok(prev);
        }
        prev + (rng.randn(sample.shape(), sample.dtype(), sample.device())? * up)?
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        original + (noise * self.sigmas[step])?
    }
}
