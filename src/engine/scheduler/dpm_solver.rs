//! `DPMSolverMultistepScheduler` as DPM-Solver++(2M) (`algorithm_type="dpmsolver++"`,
//! `solver_order=2`, midpoint), optionally with Karras sigmas.

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::ddim::Prediction;
use super::schedule::{check_steps, interp, karras_sigmas, linspace, sigma_to_t, trailing, train_sigmas};
use super::Scheduler;
use crate::noise::NoiseRng;
use crate::model::config::SchedulerConfig;

#[derive(Clone, Debug)]
pub struct DpmSolverMultistep {
    timesteps: Vec<f64>,
    /// One per timestep, then 0 (`final_sigmas_type="zero"`).
    sigmas: Vec<f64>,
    prediction: Prediction,
    /// Data predictions of the previous and current step.
    outputs: Vec<Tensor>,
    lower_order_nums: usize,
}

/// `(α_t, σ_t)` of the variance-preserving process at Karras sigma `s`.
fn alpha_sigma(s: f64) -> (f64, f64) {
    let alpha = 1.0 / (s * s + 1.0).sqrt();
    (alpha, s * alpha)
}

fn lambda(s: f64) -> f64 {
    let (a, sg) = alpha_sigma(s);
    a.ln() - sg.ln()
}

impl DpmSolverMultistep {
    pub fn new(cfg: &SchedulerConfig, steps: usize, karras: bool) -> Result<Self> {
        let n = cfg.num_train_timesteps;
        check_steps(steps, n)?;
        if cfg.thresholding {
            bail!("dynamic thresholding is not supported");
        }
        let train = train_sigmas(cfg)?;
        let mut timesteps: Vec<f64> = match cfg.timestep_spacing.as_str() {
            "linspace" => {
                let mut t: Vec<f64> = linspace(0.0, (n - 1) as f64, steps + 1).into_iter().map(f64::round_ties_even).collect();
                t.reverse();
                t.truncate(steps);
                t
            }
            "leading" => {
                let ratio = n / (steps + 1);
                (1..=steps).rev().map(|i| (i * ratio + cfg.steps_offset) as f64).collect()
            }
            "trailing" => trailing(n, steps),
            other => bail!("unsupported timestep_spacing {other:?}"),
        };
        let mut sig: Vec<f64> = if karras {
            let s = karras_sigmas(train[0], train[n - 1], steps);
            // numpy takes the log of the f32 sigmas in f32.
            let log_sigmas: Vec<f64> = train.iter().map(|&v| (v as f32).ln() as f64).collect();
            // Rounded, except for the cosine schedule, where the int64 cast truncates.
            let to_int = if cfg.beta_schedule == "squaredcos_cap_v2" { f64::trunc } else { f64::round_ties_even };
            timesteps = s.iter().map(|&v| to_int(sigma_to_t(v, &log_sigmas))).collect();
            s
        } else {
            timesteps.iter().map(|&t| interp(t, &train)).collect()
        };
        sig.push(0.0);
        // diffusers stores the sigmas as f32.
        sig.iter_mut().for_each(|v| *v = *v as f32 as f64);
        Ok(Self { timesteps, sigmas: sig, prediction: Prediction::from_config(cfg)?, outputs: vec![], lower_order_nums: 0 })
    }

    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The model output converted to a prediction of the clean sample.
    fn data_prediction(&self, model_output: &Tensor, sample: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[step]);
        match self.prediction {
            Prediction::Epsilon => (sample - (model_output * sigma)?)? / alpha,
            Prediction::VPrediction => (sample * alpha)? - (model_output * sigma)?,
            Prediction::Sample => Ok(model_output.clone()),
        }
    }
}

impl Scheduler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _step: usize) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, _rng: &mut NoiseRng) -> candle_core::Result<Tensor> {
        let x0 = self.data_prediction(model_output, sample, step)?;
        if self.outputs.len() == 2 {
            self.outputs.remove(0);
        }
        self.outputs.push(x0.clone());
        // With solver_order 2, diffusers' `lower_order_second` never lowers the order.
        let second_order = self.lower_order_nums >= 1;
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        let (s0, t) = (self.sigmas[step], self.sigmas[step + 1]);
        // final_sigmas_type "zero": the last step is first order and lands on x0.
        if t == 0.0 {
            return Ok(x0);
        }
        let (alpha_t, sigma_t) = alpha_sigma(t);
        let (_, sigma_s0) = alpha_sigma(s0);
        let h = lambda(t) - lambda(s0);
        let coef = alpha_t * ((-h).exp() - 1.0);
        let first = ((sample * (sigma_t / sigma_s0))? - (&x0 * coef)?)?;
        if !second_order {
            return Ok(first);
        }
        let h0 = lambda(s0) - lambda(self.sigmas[step - 1]);
        let d1 = ((&x0 - &self.outputs[0])? / (h0 / h))?;
        first - (d1 * (0.5 * coef))?
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[step]);
        (original * alpha)? + (noise * sigma)?
    }
}
