//! The Stable Diffusion text-to-image pipeline over a diffusers-layout model folder.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::denoise::{guided_noise_pred, uses_guidance};
use super::noise::NoiseRng;
use super::scheduler::{Scheduler, SchedulerKind};
use crate::lora::{LoraSet, LoraTargets, PipelineLora};
use crate::model::clip::ClipTextModel;
use crate::model::config::{read_json, ClipTextConfig, SchedulerConfig, UNetConfig, VaeConfig};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::model::weights::{find_weights, open};

/// Everything one generation needs besides the adapters.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub scheduler: SchedulerKind,
    /// DDIM's eta (0 = deterministic); ignored by the other schedulers.
    pub eta: f64,
    /// Initial noise `[1, C, h, w]` instead of the seeded draw (diffusers' `latents=`).
    pub latents: Option<Tensor>,
}

impl GenerateParams {
    /// `prompt` at `seed` and `width`×`height`: no negative prompt, 20 deterministic DDIM
    /// steps, guidance 7.5, seeded noise.
    pub fn new(prompt: impl Into<String>, seed: u64, width: usize, height: usize) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            steps: 20,
            guidance_scale: 7.5,
            seed,
            width,
            height,
            scheduler: SchedulerKind::Ddim,
            eta: 0.0,
            latents: None,
        }
    }
}

/// A loaded diffusers-layout Stable Diffusion model.
pub struct StableDiffusion {
    pub dir: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    pub lora_targets: LoraTargets,
    pub device: Device,
    pub dtype: DType,
}

impl StableDiffusion {
    /// Loads `model_index.json`, `tokenizer/`, `text_encoder/`, `unet/`, `vae/` and
    /// `scheduler/` from `dir`, converting weights (f32 or f16 files) to `dtype`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        if !dir.join("model_index.json").is_file() {
            bail!("{} is not a diffusers model folder: model_index.json is missing", dir.display());
        }
        let te_dir = dir.join("text_encoder");
        let te_cfg: ClipTextConfig = read_json(&te_dir.join("config.json"))?;
        let te_file = find_weights(&te_dir, "model")?;
        let text_encoder = ClipTextModel::new(open(&te_file, dtype, device)?, &te_cfg)
            .with_context(|| format!("loading text encoder from {}", te_file.display()))?;

        let unet_dir = dir.join("unet");
        let unet_cfg: UNetConfig = read_json(&unet_dir.join("config.json"))?;
        let unet_file = find_weights(&unet_dir, "diffusion_pytorch_model")?;
        let unet = UNet2DConditionModel::new(open(&unet_file, dtype, device)?, &unet_cfg)
            .with_context(|| format!("loading unet from {}", unet_file.display()))?;

        let vae_dir = dir.join("vae");
        let vae_cfg: VaeConfig = read_json(&vae_dir.join("config.json"))?;
        let vae_file = find_weights(&vae_dir, "diffusion_pytorch_model")?;
        let vae = AutoencoderKL::new(open(&vae_file, dtype, device)?, &vae_cfg)
            .with_context(|| format!("loading vae from {}", vae_file.display()))?;

        let scheduler_config = read_json(&dir.join("scheduler/scheduler_config.json"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            lora_targets: LoraTargets::from_files(&unet_file, &te_file)?,
            device: device.clone(),
            dtype,
        })
    }

    /// Pixel size of one latent cell.
    pub fn vae_scale(&self) -> usize {
        self.vae.config().downscale()
    }

    /// Checks an image size and returns the latent shape `[1, C, h, w]`.
    pub fn latent_shape(&self, width: usize, height: usize) -> Result<(usize, usize, usize, usize)> {
        let f = self.vae_scale();
        if width == 0 || height == 0 || !width.is_multiple_of(f) || !height.is_multiple_of(f) {
            bail!("width and height must be positive multiples of {f}, got {width}x{height}");
        }
        Ok((1, self.unet.config().in_channels, height / f, width / f))
    }

    /// Text embeddings `[2, T, D]` (negative prompt first) when guidance is on, else `[1, T, D]`.
    pub fn text_embeddings(&self, prompt: &str, negative: &str, guidance_scale: f64, lora: &LoraSet) -> Result<Tensor> {
        let mut texts = vec![prompt];
        if uses_guidance(guidance_scale) {
            texts.insert(0, negative);
        }
        let mut ids = Vec::new();
        for t in &texts {
            ids.extend(self.tokenizer.encode(t)?);
        }
        let ids = Tensor::from_vec(ids, (texts.len(), self.tokenizer.max_length()), &self.device)?;
        self.text_encoder.forward(&ids, lora)
    }

    /// Latents → images `[B, 3, H, W]` in `[0, 1]`.
    pub fn decode(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let z = (latents / self.vae.config().scaling_factor)?;
        let z = match self.vae.config().shift_factor {
            Some(s) => (z + s)?,
            None => z,
        };
        ((self.vae.decode(&z)? / 2.0)? + 0.5)?.clamp(0.0, 1.0)
    }

    /// Runs the whole sampler; `on_step(done, total)` is called after every denoising step
    /// and may return an error (e.g. cancellation) to stop early.
    pub fn generate(
        &self,
        params: &GenerateParams,
        lora: &PipelineLora,
        on_step: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let shape = self.latent_shape(params.width, params.height)?;
        let mut sampler = self.sampler(params, lora)?;
        let noise = match &params.latents {
            Some(l) => self.check_latents(l, shape)?,
            None => sampler.rng.randn(shape, self.dtype, &self.device)?,
        };
        let latents = (noise * sampler.scheduler.init_noise_sigma())?;
        let latents = self.denoise(&mut sampler, latents, 0, &lora.unet, &mut |_, _, l| Ok(l), on_step)?;
        Ok(self.decode(&latents)?)
    }

    /// Given initial latents (or noise) `[1, C, h, w]` on the model's device and dtype.
    pub fn check_latents(&self, latents: &Tensor, shape: (usize, usize, usize, usize)) -> Result<Tensor> {
        if latents.dims() != [shape.0, shape.1, shape.2, shape.3] {
            bail!("latents must have shape {:?}, got {:?}", shape, latents.dims())
        }
        Ok(latents.to_dtype(self.dtype)?.to_device(&self.device)?)
    }

    /// What a sampling loop runs with for `params`: the text embeddings (through the text
    /// encoder's adapters), the scheduler and the seeded noise stream.
    pub fn sampler(&self, params: &GenerateParams, lora: &PipelineLora) -> Result<Sampler> {
        let context = self.text_embeddings(
            &params.prompt,
            &params.negative_prompt,
            params.guidance_scale,
            &lora.text_encoder,
        )?;
        Ok(Sampler {
            scheduler: params.scheduler.build(&self.scheduler_config, params.steps, params.eta)?,
            rng: NoiseRng::new(params.seed),
            context,
            guidance_scale: params.guidance_scale,
        })
    }

    /// Denoises `latents` over the scheduler's steps from index `start` on. After each
    /// scheduler step, `blend(scheduler, step, latents)` gives the latents to go on with
    /// (inpainting puts the known region back); `on_step(done, total)` reports progress and
    /// may stop it.
    pub fn denoise(
        &self,
        sampler: &mut Sampler,
        mut latents: Tensor,
        start: usize,
        lora: &LoraSet,
        blend: &mut dyn FnMut(&dyn Scheduler, usize, Tensor) -> Result<Tensor>,
        on_step: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let timesteps = sampler.scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate().skip(start) {
            let input = sampler.scheduler.scale_model_input(&latents, i)?;
            let eps = guided_noise_pred(&self.unet, &input, t, &sampler.context, sampler.guidance_scale, lora)?;
            latents = sampler.scheduler.step(&eps, i, &latents, &mut sampler.rng)?;
            latents = blend(sampler.scheduler.as_ref(), i, latents)?;
            on_step(i + 1 - start, timesteps.len() - start)?;
        }
        Ok(latents)
    }
}

/// A sampling loop's state: scheduler, seeded noise stream, text embeddings and guidance.
pub struct Sampler {
    pub scheduler: Box<dyn Scheduler>,
    pub rng: NoiseRng,
    /// `[2, T, D]` (negative first) with guidance, else `[1, T, D]`.
    pub context: Tensor,
    pub guidance_scale: f64,
}
