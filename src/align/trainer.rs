//! The AlignProp training loop: sample with DDIM from seeded noise, backpropagate the reward
//! through the last K steps into LoRA factors, AdamW with clipping and accumulation.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::backprop::{recompute, Backprop, Objective, Trajectory};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use super::validation::{Selection, Validation, Validator};
use crate::noise::NoiseRng;
use crate::engine::denoise::uses_guidance;
use crate::engine::pipeline::{to_pixels, StableDiffusion};
use crate::engine::scheduler::Ddim;
use crate::lora::{LoraSet, PipelineLora, TrainableLora};
use crate::model::unet::Conditioning;
use crate::rewards::WeightedRewards;

/// How many final denoising steps carry gradient.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Truncation {
    /// The last `k` steps.
    Fixed { k: usize },
    /// `k` drawn uniformly from `min..=max` for every trajectory.
    Random { min: usize, max: usize },
}

impl Truncation {
    fn draw(&self, rng: &mut ChaCha8Rng) -> usize {
        match *self {
            Truncation::Fixed { k } => k,
            Truncation::Random { min, max } => rng.random_range(min..=max),
        }
    }

    fn max_k(&self) -> usize {
        match *self {
            Truncation::Fixed { k } => k,
            Truncation::Random { max, .. } => max,
        }
    }
}

/// Hyperparameters of one run (defaults follow the AlignProp reference where it applies).
#[derive(Clone, Debug)]
pub struct AlignConfig {
    pub prompts: Vec<String>,
    /// `None` as in generation requests (zero embeddings for SDXL's `force_zeros_for_empty_prompt`).
    pub negative_prompt: Option<String>,
    pub steps: usize,
    pub adamw: AdamWConfig,
    pub max_grad_norm: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub truncation: Truncation,
    pub sampler_steps: usize,
    pub guidance_scale: f64,
    pub eta: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub time_budget_s: Option<f64>,
    /// Keep the best state on a validation set instead of the last one.
    pub validation: Option<Validation>,
}

impl AlignConfig {
    /// Rejects inconsistent settings with a message naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.prompts.is_empty() {
            bail!("prompts: at least one prompt is required");
        }
        if self.steps == 0 || self.batch_size == 0 || self.grad_accum == 0 || self.sampler_steps == 0 {
            bail!("steps, batch_size, grad_accum and sampler_steps must be positive");
        }
        let max_k = self.truncation.max_k();
        let min_k = match self.truncation {
            Truncation::Fixed { k } => k,
            Truncation::Random { min, .. } => min,
        };
        if min_k == 0 || min_k > max_k || max_k > self.sampler_steps {
            bail!("truncation: k must satisfy 1 <= k <= sampler_steps ({})", self.sampler_steps);
        }
        if !(self.adamw.lr > 0.0 && self.adamw.lr.is_finite()) {
            bail!("learning_rate must be positive");
        }
        if self.validation.is_some_and(|v| v.images == 0 || v.every == 0) {
            bail!("validation: images and every must be positive");
        }
        Ok(())
    }
}

/// What one optimisation step measured.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StepReport {
    pub step: usize,
    pub reward_mean: f64,
    pub reward_std: f64,
    pub loss: f64,
    pub grad_norm: f64,
    pub seconds: f64,
    /// Mean reward on the validation set, on the steps where it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_reward: Option<f64>,
}

/// Why training stopped before `steps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Completed,
    TimeBudget,
}

/// The conditioning per prompt, computed once.
struct PromptCache<'a> {
    sd: &'a StableDiffusion,
    cfg: &'a AlignConfig,
    cache: HashMap<String, Conditioning>,
}

impl PromptCache<'_> {
    fn get(&mut self, prompt: &str) -> Result<Conditioning> {
        if let Some(c) = self.cache.get(prompt) {
            return Ok(c.clone());
        }
        let c = prompt_conditioning(self.sd, self.cfg, prompt)?;
        self.cache.insert(prompt.to_string(), c.clone());
        Ok(c)
    }
}

/// The conditioning of a training or validation image for `prompt`, without adapters.
fn prompt_conditioning(sd: &StableDiffusion, cfg: &AlignConfig, prompt: &str) -> Result<Conditioning> {
    let size = (cfg.width, cfg.height);
    sd.conditioning(prompt, cfg.negative_prompt.as_deref(), cfg.guidance_scale, size, &PipelineLora::default())
}

/// How a run ended.
pub struct TrainOutcome {
    pub stop: StopReason,
    /// The state kept when the run validated.
    pub selection: Option<Selection>,
}

/// Trains `lora` in place (ending with the best validated state when `cfg.validation` is
/// set); `on_step` sees every report and may return an error (e.g. cancellation) to stop.
pub fn train(
    sd: &StableDiffusion,
    cfg: &AlignConfig,
    rewards: &WeightedRewards,
    lora: &TrainableLora,
    on_step: &mut dyn FnMut(&StepReport) -> Result<()>,
) -> Result<TrainOutcome> {
    cfg.validate()?;
    let shape = sd.latent_shape(cfg.width, cfg.height)?;
    let scheduler = Ddim::new(&sd.scheduler_config, cfg.sampler_steps, cfg.eta)?;
    let mut prompts = PromptCache { sd, cfg, cache: HashMap::new() };
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut opt = AdamW::new(lora.vars().into_iter().cloned().collect(), cfg.adamw)?;
    let started = Instant::now();
    let mut validator = cfg.validation.map(|v| Validator::new(sd, cfg, v, rewards, lora)).transpose()?;
    let mut stop = StopReason::Completed;

    for step in 1..=cfg.steps {
        let t0 = Instant::now();
        let mut grads: Option<Vec<Tensor>> = None;
        let (mut rewards_seen, mut loss_sum) = (Vec::new(), 0.0);
        for _ in 0..cfg.grad_accum {
            let batch = draw_batch(sd, cfg, shape, &mut prompts, &mut rng)?;
            let bp = backprop_batch(sd, &scheduler, cfg.guidance_scale, &batch, rewards, lora)?;
            loss_sum += bp.loss;
            rewards_seen.extend(bp.rewards);
            grads = Some(match grads {
                None => bp.grads,
                Some(acc) => acc.iter().zip(&bp.grads).map(|(a, g)| a + g).collect::<candle_core::Result<_>>()?,
            });
        }
        let mut grads: Vec<Tensor> =
            grads.unwrap_or_default().iter().map(|g| g / cfg.grad_accum as f64).collect::<candle_core::Result<_>>()?;
        let loss = loss_sum / cfg.grad_accum as f64;
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            bail!("non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}");
        }
        opt.step(&grads)?;
        let out_of_time = cfg.time_budget_s.is_some_and(|b| started.elapsed().as_secs_f64() >= b) && step < cfg.steps;
        let last = out_of_time || step == cfg.steps;
        let validation_reward = match validator.as_mut() {
            Some(v) if v.due(step, last) => Some(v.measure(sd, cfg, rewards, lora, step)?),
            _ => None,
        };
        let (mean, std) = mean_std(&rewards_seen);
        let seconds = t0.elapsed().as_secs_f64();
        on_step(&StepReport { step, reward_mean: mean, reward_std: std, loss, grad_norm, seconds, validation_reward })?;
        if out_of_time {
            stop = StopReason::TimeBudget;
            break;
        }
    }
    let selection = validator.map(|v| v.restore_best(lora)).transpose()?;
    Ok(TrainOutcome { stop, selection })
}

/// The trajectories of one micro-batch, sampled together.
pub struct Batch {
    pub prompts: Vec<String>,
    /// Each trajectory's conditioning, as [`StableDiffusion::conditioning`] returns it.
    pub conds: Vec<Conditioning>,
    /// Initial noise `[B, C, h, w]`.
    pub x_t: Tensor,
    /// DDIM noise per step `[B, C, h, w]` when eta > 0 (empty otherwise).
    pub step_noise: Vec<Option<Tensor>>,
    /// Final steps carrying gradient, per trajectory.
    pub ks: Vec<usize>,
}

/// Draws a micro-batch from `rng`, trajectory by trajectory: prompt, noise seed, truncation.
fn draw_batch(sd: &StableDiffusion, cfg: &AlignConfig, shape: (usize, usize, usize, usize), prompts: &mut PromptCache, rng: &mut ChaCha8Rng) -> Result<Batch> {
    let (mut batch_prompts, mut conds, mut ks) = (vec![], vec![], vec![]);
    let (mut starts, mut noises): (Vec<Tensor>, Vec<Vec<Tensor>>) = (vec![], vec![]);
    for _ in 0..cfg.batch_size {
        let prompt = cfg.prompts[rng.random_range(0..cfg.prompts.len())].clone();
        conds.push(prompts.get(&prompt)?);
        batch_prompts.push(prompt);
        let mut noise = NoiseRng::new(rng.random());
        starts.push(noise.randn(shape, sd.dtype, &sd.device)?);
        if cfg.eta > 0.0 {
            noises.push((0..cfg.sampler_steps).map(|_| noise.randn(shape, sd.dtype, &sd.device)).collect::<candle_core::Result<_>>()?);
        }
        ks.push(cfg.truncation.draw(rng));
    }
    let step_noise = match cfg.eta > 0.0 {
        true => (0..cfg.sampler_steps)
            .map(|i| Tensor::cat(&noises.iter().map(|n| &n[i]).collect::<Vec<_>>(), 0).map(Some))
            .collect::<candle_core::Result<_>>()?,
        false => vec![],
    };
    Ok(Batch { prompts: batch_prompts, conds, x_t: Tensor::cat(&starts, 0)?, step_noise, ks })
}

/// Per-trajectory conditionings stacked for one batched UNet call: with guidance the
/// unconditional rows of every trajectory first, then their prompts.
fn batch_conditioning(conds: &[Conditioning], guidance_scale: f64) -> candle_core::Result<Conditioning> {
    if !uses_guidance(guidance_scale) {
        return Conditioning::cat(conds);
    }
    let rows = |r: usize| conds.iter().map(|c| c.narrow(r, 1)).collect::<candle_core::Result<Vec<_>>>();
    Conditioning::cat(&[rows(0)?, rows(1)?].concat())
}

/// The loss (minus the mean weighted reward) of a micro-batch and its LoRA gradient, the
/// trajectories sharing each UNet call and the backward pass recomputing layer by layer.
pub fn backprop_batch(
    sd: &StableDiffusion,
    scheduler: &Ddim,
    guidance_scale: f64,
    batch: &Batch,
    rewards: &WeightedRewards,
    lora: &TrainableLora,
) -> Result<Backprop> {
    let cond = batch_conditioning(&batch.conds, guidance_scale)?;
    let traj = Trajectory { unet: &sd.unet, scheduler, cond: &cond, guidance_scale, step_noise: batch.step_noise.clone() };
    let score = |decoded: &Tensor| {
        let r = rewards.score(&to_pixels(decoded)?, &batch.prompts)?;
        Ok((r.mean_all()?.neg()?, r))
    };
    let decoder = sd.vae.scaled_decoder();
    Ok(recompute(&traj, lora, &batch.x_t, &batch.ks, &Objective { decoder: &decoder, score: &score })?)
}

/// Mean and population standard deviation.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
    (mean, var.sqrt())
}

/// Mean reward of images generated (DDIM, no gradient) for every `(prompt, seed)` pair.
pub fn evaluate(
    sd: &StableDiffusion,
    cfg: &AlignConfig,
    rewards: &WeightedRewards,
    lora: &LoraSet,
    cases: &[(String, u64)],
) -> Result<f64> {
    let scheduler = Ddim::new(&sd.scheduler_config, cfg.sampler_steps, 0.0)?;
    let shape = sd.latent_shape(cfg.width, cfg.height)?;
    let mut total = 0.0;
    for (prompt, seed) in cases {
        let cond = prompt_conditioning(sd, cfg, prompt)?;
        let traj = Trajectory { unet: &sd.unet, scheduler: &scheduler, cond: &cond, guidance_scale: cfg.guidance_scale, step_noise: vec![] };
        let x_t = NoiseRng::new(*seed).randn(shape, sd.dtype, &sd.device)?;
        let x0 = traj.run(0..traj.len(), &x_t, lora)?;
        let r = rewards.score(&sd.decode(&x0)?, std::slice::from_ref(prompt))?;
        total += r.to_dtype(candle_core::DType::F64)?.mean_all()?.to_scalar::<f64>()?;
    }
    Ok(total / cases.len().max(1) as f64)
}

