//! `EulerDiscreteScheduler` (SDXL's default): deterministic Euler steps in sigma space
//! (`s_churn = 0`), with linear sigma interpolation or Karras sigmas; and
//! `EulerAncestralDiscreteScheduler`, which steps down further and adds fresh noise.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::ddim::Prediction;
use super::schedule::{interp, karras_sigmas, sigma_to_t, spaced_timesteps, train_sigmas};
use super::Scheduler;
use crate::noise::NoiseRng;
use crate::model::config::SchedulerConfig;

/// The timesteps, sigmas and initial noise scale of diffusers' Euler schedulers, in f32 as
/// diffusers keeps them.
#[derive(Clone, Debug)]
struct SigmaSchedule {
    timesteps: Vec<f64>,
    /// One per timestep, then `final_sigma`.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
}

impl SigmaSchedule {
    /// Spaced timesteps with sigmas interpolated from the training schedule, or Karras sigmas
    /// (`karras`) with the timesteps they map back to.
    fn new(cfg: &SchedulerConfig, steps: usize, karras: bool, final_sigma: f64) -> Result<Self> {
        let train = train_sigmas(cfg)?;
        let mut timesteps: Vec<f64> = spaced_timesteps(cfg, steps)?.into_iter().map(|t| t as f32 as f64).collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &train)).collect();
        if karras {
            let lo = cfg.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let hi = cfg.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras_sigmas(lo, hi, steps);
            // numpy takes the log of the f32 training sigmas in f32.
            let log_sigmas: Vec<f64> = train.iter().map(|&v| (v as f32).ln() as f64).collect();
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas) as f32 as f64).collect();
        }
        sigmas.push(final_sigma);
        sigmas.iter_mut().for_each(|v| *v = *v as f32 as f64);
        let max = sigmas.iter().cloned().fold(0.0, f64::max) as f32;
        let init_noise_sigma = match cfg.timestep_spacing.as_str() {
            "linspace" | "trailing" => max,
            _ => (max * max + 1.0).sqrt(),
        } as f64;
        Ok(Self { timesteps, sigmas, init_noise_sigma })
    }
}

/// Euler (deterministic) or Euler ancestral sampling.
#[derive(Clone, Debug)]
pub struct Euler {
    schedule: SigmaSchedule,
    prediction: Prediction,
    ancestral: bool,
}

impl Euler {
    /// `EulerDiscreteScheduler`.
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
        let final_sigma = match cfg.final_sigmas_type.as_str() {
            "zero" => 0.0,
            "sigma_min" => train_sigmas(cfg)?[0],
            other => bail!("euler scheduler: unsupported final_sigmas_type {other:?}"),
        };
        let schedule = SigmaSchedule::new(cfg, steps, cfg.use_karras_sigmas, final_sigma)?;
        Ok(Self { schedule, prediction: Prediction::from_config(cfg)?, ancestral: false })
    }

    /// `EulerAncestralDiscreteScheduler` (no Karras sigmas; the last sigma is 0).
    pub fn ancestral(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        Ok(Self { schedule: SigmaSchedule::new(cfg, steps, false, 0.0)?, prediction: Prediction::from_config(cfg)?, ancestral: true })
    }

    pub fn sigmas(&self) -> &[f64] {
        &self.schedule.sigmas
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        let s = self.schedule.sigmas[step] as f32;
        sample / (s * s + 1.0).sqrt() as f64
    }

    /// diffusers computes the step in f32 (at least) and casts back to the model's dtype.
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, rng: &mut NoiseRng) -> candle_core::Result<Tensor> {
        let dtype = model_output.dtype();
        let work = if matches!(dtype, DType::F16 | DType::BF16) { DType::F32 } else { dtype };
        let (sample, output) = (sample.to_dtype(work)?, model_output.to_dtype(work)?);
        let (sigma, next) = (self.schedule.sigmas[step], self.schedule.sigmas[step + 1]);
        let x0 = match self.prediction {
            Prediction::Epsilon => (&sample - (&output * sigma)?)?,
            Prediction::VPrediction => ((&output * (-sigma / (sigma * sigma + 1.0).sqrt()))? + (&sample / (sigma * sigma + 1.0))?)?,
            Prediction::Sample => output,
        };
        // Ancestral: step down to σ_down and add fresh noise of σ_up (σ_down² + σ_up² = σ'²).
        let (down, up) = match self.ancestral {
            true => {
                let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).max(0.0).sqrt();
                ((next * next - up * up).max(0.0).sqrt(), up)
            }
            false => (next, 0.0),
        };
        let derivative = ((&sample - x0)? / sigma)?;
        let mut prev = (&sample + (derivative * (down - sigma))?)?;
        if up > 0.0 {
            prev = (prev + (rng.randn(sample.shape(), dtype, sample.device())?.to_dtype(work)? * up)?)?;
        }
        prev.to_dtype(dtype)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        original + (noise * self.schedule.sigmas[step])?
    }
}
