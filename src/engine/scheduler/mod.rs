//! Diffusion schedulers with diffusers' formulas: DDIM, Euler, Euler ancestral and
//! DPM-Solver++(2M).

mod ddim;
mod dpm_solver;
mod euler;
pub mod schedule;

use std::str::FromStr;

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

pub use ddim::{Ddim, Prediction};
pub use dpm_solver::DpmSolverMultistep;
pub use euler::Euler;

use crate::noise::NoiseRng;
use crate::model::config::SchedulerConfig;

/// A sampler over a fixed list of timesteps.
pub trait Scheduler: Send {
    /// Model timesteps, highest first.
    fn timesteps(&self) -> &[f64];
    /// Scale of the initial noise.
    fn init_noise_sigma(&self) -> f64;
    /// The UNet input at step index `step`.
    fn scale_model_input(&self, sample: &Tensor, step: usize) -> candle_core::Result<Tensor>;
    /// The sample after step index `step` given the model output there.
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, rng: &mut NoiseRng) -> candle_core::Result<Tensor>;
    /// `original` noised with `noise` to the noise level of step index `step` (diffusers'
    /// `add_noise` at that step: image-to-image starts, inpainting's re-noised image).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> candle_core::Result<Tensor>;
}

/// The schedulers a request can pick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    #[default]
    Ddim,
    Euler,
    EulerA,
    #[serde(rename = "dpmpp_2m")]
    DpmPp2m,
    #[serde(rename = "dpmpp_2m_karras")]
    DpmPp2mKarras,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 5] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerA,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerA => "euler_a",
            SchedulerKind::DpmPp2m => "dpmpp_2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp_2m_karras",
        }
    }

    /// A scheduler for `steps` sampling steps over the model's training schedule; `eta` is
    /// used by DDIM only.
    pub fn build(self, cfg: &SchedulerConfig, steps: usize, eta: f64) -> Result<Box<dyn Scheduler>> {
        Ok(match self {
            SchedulerKind::Ddim => Box::new(Ddim::new(cfg, steps, eta)?),
            SchedulerKind::Euler => Box::new(Euler::new(cfg, steps)?),
            SchedulerKind::EulerA => Box::new(Euler::ancestral(cfg, steps)?),
            SchedulerKind::DpmPp2m => Box::new(DpmSolverMultistep::new(cfg, steps, false)?),
            SchedulerKind::DpmPp2mKarras => Box::new(DpmSolverMultistep::new(cfg, steps, true)?),
        })
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SchedulerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match SchedulerKind::ALL.into_iter().find(|k| k.as_str() == s) {
            Some(k) => Ok(k),
            None => bail!("unknown scheduler {s:?} (expected ddim, euler, euler_a, dpmpp_2m or dpmpp_2m_karras)"),
        }
    }
}

#[cfg(test)]
mod tests;
