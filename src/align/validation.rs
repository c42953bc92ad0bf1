//! Checkpoint selection on a fixed validation set: the run's LoRA is scored before training and
//! every few steps, and the best-scoring state is what the run ends with. A reward
//! backpropagated from a handful of trajectories per step is noisy, and a run can drift to a
//! worse model; selection turns such a run into "no change" instead of a loss.

use anyhow::Result;
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::trainer::{evaluate, AlignConfig};
use crate::engine::pipeline::StableDiffusion;
use crate::lora::TrainableLora;
use crate::rewards::WeightedRewards;

/// How to validate: the mean reward of `images` fixed (training prompt, seed) pairs, measured
/// before training, every `every` steps and after the last step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Validation {
    #[schema(example = 32)]
    pub images: usize,
    #[schema(example = 10)]
    pub every: usize,
}

/// Which state a validated run kept.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// Validation reward of the starting LoRA.
    pub start_reward: f64,
    /// The step whose LoRA was kept (0: the starting one, i.e. training never beat it).
    pub step: usize,
    pub reward: f64,
}

/// The validation cases, the best state so far and when to measure.
pub struct Validator {
    every: usize,
    cases: Vec<(String, u64)>,
    start_reward: f64,
    best: (usize, f64, Vec<Tensor>),
}

impl Validator {
    /// The (prompt, seed) pairs a run validates on: the prompts in turn, seeds drawn from the
    /// run's seed apart from the training stream.
    pub fn cases(cfg: &AlignConfig, v: Validation) -> Vec<(String, u64)> {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x7a11_da7e);
        (0..v.images).map(|i| (cfg.prompts[i % cfg.prompts.len()].clone(), rng.random())).collect()
    }

    /// Draws the cases and scores the starting LoRA.
    pub fn new(sd: &StableDiffusion, cfg: &AlignConfig, v: Validation, rewards: &WeightedRewards, lora: &TrainableLora) -> Result<Self> {
        let cases = Self::cases(cfg, v);
        let mut validator = Self { every: v.every, cases, start_reward: 0.0, best: (0, f64::NEG_INFINITY, vec![]) };
        validator.start_reward = validator.measure(sd, cfg, rewards, lora, 0)?;
        Ok(validator)
    }

    /// Whether `step` is measured (every `every` steps and the last one).
    pub fn due(&self, step: usize, last: bool) -> bool {
        last || step.is_multiple_of(self.every)
    }

    /// Scores the current LoRA after `step`, keeping a copy if it is the first state scored
    /// or beats every earlier one.
    pub fn measure(&mut self, sd: &StableDiffusion, cfg: &AlignConfig, rewards: &WeightedRewards, lora: &TrainableLora, step: usize) -> Result<f64> {
        let reward = evaluate(sd, cfg, rewards, &lora.detached_set(), &self.cases)?;
        if self.best.2.is_empty() || reward > self.best.1 {
            let weights = lora.vars().iter().map(|v| v.as_detached_tensor().copy()).collect::<candle_core::Result<_>>()?;
            self.best = (step, reward, weights);
        }
        Ok(reward)
    }

    /// Puts the best state back into `lora`.
    pub fn restore_best(self, lora: &TrainableLora) -> Result<Selection> {
        let (step, reward, weights) = self.best;
        for (var, w) in lora.vars().into_iter().zip(&weights) {
            var.set(w)?;
        }
        Ok(Selection { start_reward: self.start_reward, step, reward })
    }
}
