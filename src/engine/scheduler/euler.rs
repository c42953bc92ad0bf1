//! `EulerDiscreteScheduler` (SDXL's default): deterministic Euler steps in sigma space
//! (`s_churn = 0`), with linear sigma interpolation or Karras sigmas.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::ddim::Prediction;
use super::schedule::{interp, karras_sigmas, sigma_to_t, spaced_timesteps, train_sigmas};
use super::Scheduler;
use crate::engine::noise::NoiseRng;
use crate::model::config::SchedulerConfig;

#[derive(Clone, Debug)]
pub struct Euler {
    timesteps: Vec<f64>,
    /// One per timestep, then the final sigma (0, or the smallest training sigma).
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
}

impl Euler {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let unsupported = [
            ("interpolation_type", cfg.interpolation_type != "linear"),
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
            ("timestep_type", cfg.timestep_type != "discrete"),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, bad)| *bad) {
            bail!("euler scheduler: unsupported setting {name}");
        }
        let train = train_sigmas(cfg)?;
        // diffusers keeps the timesteps and sigmas in f32.
        let mut timesteps: Vec<f64> = spaced_timesteps(cfg, steps)?.into_iter().map(|t| t as f32 as f64).collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &train)).collect();
        if cfg.use_karras_sigmas {
            let lo = cfg.sigma_min.unwrap_or(sigmas[sigmas.len() - 1] as f32 as f64);
            let hi = cfg.sigma_max.unwrap_or(sigmas[0] as f32 as f64);
            sigmas = karras_sigmas(lo, hi, steps);
            // numpy takes the log of the f32 training sigmas in f32.
            let log_sigmas: Vec<f64> = train.iter().map(|&v| (v as f32).ln() as f64).collect();
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas) as f32 as f64).collect();
        }
        sigmas.push(match cfg.final_sigmas_type.as_str() {
            "zero" => 0.0,
            "sigma_min" => train[0],
            other => bail!("euler scheduler: unsupported final_sigmas_type {other:?}"),
        });
        sigmas.iter_mut().for_each(|v| *v = *v as f32 as f64);
        let max = sigmas.iter().cloned().fold(0.0, f64::max) as f32;
        let init_noise_sigma = match cfg.timestep_spacing.as_str() {
            "linspace" | "trailing" => max,
            _ => (max * max + 1.0).sqrt(),
        } as f64;
        Ok(Self { timesteps, sigmas, init_noise_sigma, prediction: Prediction::from_config(cfg)? })
    }

    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        let s = self.sigmas[step] as f32;
        sample / (s * s + 1.0).sqrt() as f64
    }

    /// diffusers computes the step in f32 (at least) and casts back to the model's dtype.
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, _rng: &mut NoiseRng) -> candle_core::Result<Tensor> {
        let dtype = model_output.dtype();
        let work = if matches!(dtype, DType::F16 | DType::BF16) { DType::F32 } else { dtype };
        let (sample, output) = (sample.to_dtype(work)?, model_output.to_dtype(work)?);
        let (sigma, next) = (self.sigmas[step], self.sigmas[step + 1]);
        let x0 = match self.prediction {
            Prediction::Epsilon => (&sample - (&output * sigma)?)?,
            Prediction::VPrediction => ((&output * (-sigma / (sigma * sigma + 1.0).sqrt()))? + (&sample / (sigma * sigma + 1.0))?)?,
            Prediction::Sample => output,
        };
        let derivative = ((&sample - x0)? / sigma)?;
        (sample + (derivative * (next - sigma))?)?.to_dtype(dtype)
    }
}
