//! The `/align` job request: validation and conversion into an [`AlignConfig`].

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::optim::AdamWConfig;
use super::prompts::prompt_set;
use super::trainer::{AlignConfig, Truncation};
use super::validation::Validation;
use crate::engine::pipeline::StableDiffusion;
use crate::rewards::registry::RewardSpec;

/// How many final denoising steps carry gradient: `{"k": 1}` or `{"random": [1, 3]}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TruncationRequest {
    Fixed { k: usize },
    Random { random: [usize; 2] },
}

impl Default for TruncationRequest {
    fn default() -> Self {
        TruncationRequest::Fixed { k: 1 }
    }
}

/// `POST /v1/align/jobs`: an AlignProp run producing a LoRA adapter.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlignRequest {
    /// Name of the adapter to write under adapters/ on success.
    #[schema(example = "brighter")]
    pub adapter_name: String,
    /// Training prompts (or give `prompt_set`), each at most as long as the text encoder sees
    /// (75 tokens for SD 1.x / 2.x).
    #[serde(default)]
    pub prompts: Option<Vec<String>>,
    /// A built-in prompt list: `shapes` or `simple_animals`.
    #[serde(default)]
    pub prompt_set: Option<String>,
    /// Guidance's unconditional prompt; left out as in generation requests (the empty prompt,
    /// or zero embeddings on SDXL models).
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Weighted rewards to maximise.
    pub rewards: Vec<RewardSpec>,
    /// Optimiser steps.
    #[serde(default = "defaults::steps")]
    #[schema(default = 10, minimum = 1, maximum = 1000)]
    pub steps: usize,
    #[serde(default = "defaults::learning_rate")]
    #[schema(default = 1e-3, exclusive_minimum = 0.0)]
    pub learning_rate: f64,
    #[serde(default = "defaults::weight_decay")]
    #[schema(default = 1e-4, minimum = 0.0)]
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    #[serde(default = "defaults::max_grad_norm")]
    #[schema(default = 1.0, exclusive_minimum = 0.0)]
    pub max_grad_norm: f64,
    /// Trajectories per micro-batch.
    #[serde(default = "defaults::one")]
    #[schema(default = 1, minimum = 1, maximum = 64)]
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    #[serde(default = "defaults::one")]
    #[schema(default = 1, minimum = 1, maximum = 64)]
    pub grad_accum: usize,
    #[serde(default = "defaults::rank")]
    #[schema(default = 4, minimum = 1, maximum = 64)]
    pub lora_rank: usize,
    /// Defaults to the rank (scale 1).
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0)]
    pub lora_alpha: Option<f64>,
    #[serde(default)]
    pub truncation: TruncationRequest,
    /// DDIM steps per trajectory.
    #[serde(default = "defaults::sampler_steps")]
    #[schema(default = 10, minimum = 1, maximum = 100)]
    pub sampler_steps: usize,
    #[serde(default = "defaults::guidance_scale")]
    #[schema(default = 7.5, minimum = 0.0, maximum = 50.0)]
    pub guidance_scale: f64,
    /// DDIM eta during training (0 = deterministic).
    #[serde(default)]
    #[schema(default = 0.0, minimum = 0.0, maximum = 1.0)]
    pub eta: f64,
    /// Random when omitted; the seed used is recorded.
    #[serde(default)]
    pub seed: Option<u64>,
    /// An existing adapter (attention projections) to continue from.
    #[serde(default)]
    pub init_adapter: Option<String>,
    /// Stop early (successfully) once this many seconds have passed.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0)]
    pub time_budget_s: Option<f64>,
    /// Keep the best state on a validation set (`{"images": 32, "every": 10}`): the mean
    /// reward of that many fixed (training prompt, seed) pairs, measured before training,
    /// every `every` steps and at the end. Off by default (the last state is kept).
    #[serde(default)]
    pub validation: Option<Validation>,
    /// Image width in pixels; defaults to the model's native size (UNet `sample_size` × the
    /// VAE's scale factor: 512 for SD 1.5, 1024 for SDXL, 64 for the embedded default model).
    /// A multiple of the model's VAE scale times its UNet's downsampling (8 for the default
    /// model, 64 for SD 1.x / 2.x, 32 for SDXL), with width × height at most 1024 × 1024.
    #[serde(default)]
    #[schema(example = 512, minimum = 1)]
    pub width: Option<usize>,
    /// Image height in pixels, as `width`.
    #[serde(default)]
    #[schema(example = 512, minimum = 1)]
    pub height: Option<usize>,
    /// Replace an existing adapter of the same name.
    #[serde(default)]
    pub overwrite: bool,
}

mod defaults {
    pub fn steps() -> usize {
        10
    }
    pub fn learning_rate() -> f64 {
        1e-3
    }
    pub fn weight_decay() -> f64 {
        1e-4
    }
    pub fn max_grad_norm() -> f64 {
        1.0
    }
    pub fn one() -> usize {
        1
    }
    pub fn rank() -> usize {
        4
    }
    pub fn sampler_steps() -> usize {
        10
    }
    pub fn guidance_scale() -> f64 {
        7.5
    }
}

/// Upper bounds a server puts on requests.
#[derive(Clone, Copy, Debug)]
pub struct AlignLimits {
    pub max_steps: usize,
    pub max_sampler_steps: usize,
    pub max_batch: usize,
    pub max_rank: usize,
    pub max_pixels: usize,
    pub max_validation_images: usize,
}

impl Default for AlignLimits {
    fn default() -> Self {
        Self { max_steps: 1000, max_sampler_steps: 100, max_batch: 64, max_rank: 64, max_pixels: 1024 * 1024, max_validation_images: 256 }
    }
}

/// A rejected field: `(param, message)`.
pub type Invalid = (&'static str, String);

impl AlignRequest {
    /// The prompts to train on.
    pub fn prompt_list(&self) -> Result<Vec<String>, Invalid> {
        match (&self.prompts, &self.prompt_set) {
            (Some(p), None) if !p.is_empty() && p.iter().all(|s| !s.trim().is_empty()) => Ok(p.clone()),
            (Some(_), None) => Err(("prompts", "prompts must be a non-empty list of non-empty strings".into())),
            (None, Some(name)) => prompt_set(name).ok_or_else(|| {
                ("prompt_set", format!("unknown prompt_set {name:?} (available: shapes, simple_animals)"))
            }),
            (Some(_), Some(_)) => Err(("prompts", "give either prompts or prompt_set, not both".into())),
            (None, None) => Err(("prompts", "prompts or prompt_set is required".into())),
        }
    }

    /// The image size: the request's, else the model's native `native`×`native`.
    pub fn size(&self, native: usize) -> (usize, usize) {
        (self.width.unwrap_or(native), self.height.unwrap_or(native))
    }

    /// Checks ranges and converts to a training config with the given seed, for a model whose
    /// native image size is `native`.
    pub fn to_config(&self, limits: &AlignLimits, seed: u64, native: usize) -> Result<AlignConfig, Invalid> {
        let range = |param: &'static str, v: usize, max: usize| {
            if v == 0 || v > max {
                Err((param, format!("{param} must be between 1 and {max}, got {v}")))
            } else {
                Ok(())
            }
        };
        range("steps", self.steps, limits.max_steps)?;
        range("sampler_steps", self.sampler_steps, limits.max_sampler_steps)?;
        range("batch_size", self.batch_size, limits.max_batch)?;
        range("grad_accum", self.grad_accum, limits.max_batch)?;
        range("lora_rank", self.lora_rank, limits.max_rank)?;
        if let Some(v) = self.validation {
            range("validation", v.images, limits.max_validation_images)?;
            range("validation", v.every, self.steps)?;
        }
        let (width, height) = self.size(native);
        if width * height > limits.max_pixels || width == 0 || height == 0 {
            return Err(("width", format!("width × height must be between 1 and {} pixels", limits.max_pixels)));
        }
        let positive = |param: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err((param, format!("{param} must be a positive number")))
            }
        };
        positive("learning_rate", self.learning_rate)?;
        positive("max_grad_norm", self.max_grad_norm)?;
        if let Some(a) = self.lora_alpha {
            positive("lora_alpha", a)?;
        }
        if let Some(t) = self.time_budget_s {
            positive("time_budget_s", t)?;
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(("weight_decay", "weight_decay must be >= 0".into()));
        }
        if !(self.guidance_scale.is_finite() && (0.0..=50.0).contains(&self.guidance_scale)) {
            return Err(("guidance_scale", "guidance_scale must be in [0, 50]".into()));
        }
        if !(self.eta.is_finite() && (0.0..=1.0).contains(&self.eta)) {
            return Err(("eta", "eta must be in [0, 1]".into()));
        }
        if self.rewards.is_empty() {
            return Err(("rewards", "at least one reward is required".into()));
        }
        let truncation = match self.truncation {
            TruncationRequest::Fixed { k } => Truncation::Fixed { k },
            TruncationRequest::Random { random: [min, max] } => Truncation::Random { min, max },
        };
        let cfg = AlignConfig {
            prompts: self.prompt_list()?,
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            adamw: AdamWConfig { lr: self.learning_rate, weight_decay: self.weight_decay, ..Default::default() },
            max_grad_norm: self.max_grad_norm,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            truncation,
            sampler_steps: self.sampler_steps,
            guidance_scale: self.guidance_scale,
            eta: self.eta,
            seed,
            width,
            height,
            time_budget_s: self.time_budget_s,
            validation: self.validation,
        };
        cfg.validate().map_err(|e| ("truncation", e.to_string()))?;
        Ok(cfg)
    }

    pub fn alpha(&self) -> f64 {
        self.lora_alpha.unwrap_or(self.lora_rank as f64)
    }

    /// Checks what the model itself bounds: the size must give latents the UNet downsamples
    /// and upsamples back exactly (its backward pass has no non-integer upscaling), and no
    /// prompt may be longer than the text encoder sees.
    pub fn check_model(&self, model: &StableDiffusion) -> Result<(), Invalid> {
        let multiple = model.vae_scale() * model.unet.config().downscale();
        let (width, height) = self.size(model.native_size());
        for (param, v) in [("width", width), ("height", height)] {
            if !v.is_multiple_of(multiple) {
                return Err((
                    param,
                    format!("{param} must be a multiple of {multiple} for training on this model (its VAE scale times the UNet's downsampling), got {v}"),
                ));
            }
        }
        let limit = model.tokenizer.max_content_tokens();
        let prompts = self.prompt_list()?;
        let long = |text: &str| model.tokenizer.count_tokens(text) > limit;
        if let Some((i, p)) = prompts.iter().enumerate().find(|(_, p)| long(p)) {
            return Err((
                "prompts",
                format!("prompt {i} ({p:?}) is {} tokens long; the text encoder sees at most {limit}", model.tokenizer.count_tokens(p)),
            ));
        }
        match &self.negative_prompt {
            Some(n) if long(n) => Err((
                "negative_prompt",
                format!("negative_prompt is {} tokens long; the text encoder sees at most {limit}", model.tokenizer.count_tokens(n)),
            )),
            _ => Ok(()),
        }
    }
}
