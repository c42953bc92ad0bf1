//! The Stable Diffusion text-to-image pipeline over a diffusers-layout model folder (SD 1.x,
//! 2.x and SDXL).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::denoise::guided_noise_pred;
use crate::noise::NoiseRng;
use super::scheduler::{Scheduler, SchedulerKind};
use crate::lora::{LoraSet, LoraTargets, PipelineLora};
use crate::model::clip::ClipTextModel;
use crate::model::config::{read_json, ClipTextConfig, ModelIndex, SchedulerConfig, UNetConfig, VaeConfig};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::{Conditioning, UNet2DConditionModel};
use crate::model::vae::AutoencoderKL;
use crate::model::weights::{find_weights, open, open_rounded};

/// Everything one generation needs besides the adapters.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub prompt: String,
    /// `None` is diffusers' `negative_prompt=None`: the empty prompt, or zero embeddings for
    /// SDXL models with `force_zeros_for_empty_prompt`.
    pub negative_prompt: Option<String>,
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
            negative_prompt: None,
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

/// Which Stable Diffusion family a model is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelFamily {
    /// SD 1.x: one CLIP text encoder (`hidden_act: quick_gelu`).
    Sd1,
    /// SD 2.x: one OpenCLIP text encoder (`hidden_act: gelu`).
    Sd2,
    /// SDXL: two text encoders and a UNet with added text/time conditions.
    Sdxl,
}

/// What SDXL adds to a pipeline: the second tokenizer and text encoder.
pub struct SdxlText {
    pub tokenizer_2: ClipTokenizer,
    /// `CLIPTextModelWithProjection`.
    pub text_encoder_2: ClipTextModel,
    /// `model_index.json`: without a negative prompt, guidance uses zero embeddings.
    pub force_zeros_for_empty_prompt: bool,
}

/// A loaded diffusers-layout Stable Diffusion model.
pub struct StableDiffusion {
    pub dir: PathBuf,
    pub family: ModelFamily,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    /// `Some` for SDXL.
    pub sdxl: Option<SdxlText>,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    /// The VAE's weights' dtype: f32 for an f16 SDXL model whose VAE says `force_upcast`.
    pub vae_dtype: DType,
    pub scheduler_config: SchedulerConfig,
    pub lora_targets: LoraTargets,
    pub device: Device,
    pub dtype: DType,
    /// Decode in overlapping tiles (diffusers' `enable_tiling()`): bounded memory at any
    /// size, seams blended (an approximation); off by default.
    pub vae_tiling: bool,
}

/// A text encoder folder's config, weight file and model.
fn load_text_encoder(dir: &Path, dtype: DType, device: &Device) -> Result<(ClipTextConfig, PathBuf, ClipTextModel)> {
    let cfg: ClipTextConfig = read_json(&dir.join("config.json"))?;
    let file = find_weights(dir, "model")?;
    let model = ClipTextModel::new(open(&file, dtype, device)?, &cfg)
        .with_context(|| format!("loading text encoder from {}", file.display()))?;
    Ok((cfg, file, model))
}

impl StableDiffusion {
    /// Loads `model_index.json`, `tokenizer/`, `text_encoder/`, `unet/`, `vae/` and
    /// `scheduler/` from `dir` (and SDXL's `tokenizer_2/`, `text_encoder_2/`), converting
    /// weights (f32 or f16 files) to `dtype`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        if !dir.join("model_index.json").is_file() {
            bail!("{} is not a diffusers model folder: model_index.json is missing", dir.display());
        }
        let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
        let (te_cfg, te_file, text_encoder) = load_text_encoder(&dir.join("text_encoder"), dtype, device)?;

        let unet_dir = dir.join("unet");
        let unet_cfg: UNetConfig = read_json(&unet_dir.join("config.json"))?;
        let unet_file = find_weights(&unet_dir, "diffusion_pytorch_model")?;
        let unet = UNet2DConditionModel::new(open(&unet_file, dtype, device)?, &unet_cfg)
            .with_context(|| format!("loading unet from {}", unet_file.display()))?;

        let mut lora_targets = LoraTargets::from_files(&unet_file, &te_file)?;
        let te2_dir = dir.join("text_encoder_2");
        let sdxl = match (unet.takes_added_conditions(), te2_dir.is_dir()) {
            (false, false) => None,
            (true, true) => {
                let (_, te2_file, text_encoder_2) = load_text_encoder(&te2_dir, dtype, device)?;
                check_sdxl(&unet_cfg, &text_encoder, &text_encoder_2)?;
                lora_targets = lora_targets.with_text_encoder_2(&te2_file)?;
                Some(SdxlText {
                    tokenizer_2: ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?,
                    text_encoder_2,
                    force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
                })
            }
            (true, false) => bail!(
                "the UNet takes SDXL's added conditions (addition_embed_type \"text_time\") but {} has no text_encoder_2/ (SDXL refiner folders are not supported)",
                dir.display()
            ),
            (false, true) => bail!("{} has a text_encoder_2/ but its UNet has no addition_embed_type \"text_time\"", dir.display()),
        };
        let family = match (&sdxl, te_cfg.hidden_act.as_str()) {
            (Some(_), _) => ModelFamily::Sdxl,
            (None, "gelu") => ModelFamily::Sd2,
            (None, _) => ModelFamily::Sd1,
        };

        let vae_dir = dir.join("vae");
        let vae_cfg: VaeConfig = read_json(&vae_dir.join("config.json"))?;
        if family == ModelFamily::Sdxl && vae_cfg.latents_mean.is_some() && vae_cfg.latents_std.is_some() {
            bail!("vae config: latents_mean / latents_std (used by SDXL pipelines) are not supported");
        }
        let vae_file = find_weights(&vae_dir, "diffusion_pytorch_model")?;
        // StableDiffusionXLPipeline decodes with the f16 VAE upcast to f32 when it says so.
        let upcast = family == ModelFamily::Sdxl && dtype == DType::F16 && vae_cfg.force_upcast;
        let (vae_dtype, vae_vb) = match upcast {
            true => (DType::F32, open_rounded(&vae_file, dtype, DType::F32, device)?),
            false => (dtype, open(&vae_file, dtype, device)?),
        };
        let vae = AutoencoderKL::new(vae_vb, &vae_cfg).with_context(|| format!("loading vae from {}", vae_file.display()))?;

        let scheduler_config = read_json(&dir.join("scheduler/scheduler_config.json"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            family,
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            text_encoder,
            sdxl,
            unet,
            vae,
            vae_dtype,
            scheduler_config,
            lora_targets,
            device: device.clone(),
            dtype,
            vae_tiling: false,
        })
    }

    /// Pixel size of one latent cell.
    pub fn vae_scale(&self) -> usize {
        self.vae.config().downscale()
    }

    /// The image side the model was trained at: UNet `sample_size` × the VAE scale factor.
    pub fn native_size(&self) -> usize {
        self.unet.config().sample_size * self.vae_scale()
    }

    /// Checks an image size and returns the latent shape `[1, C, h, w]`.
    pub fn latent_shape(&self, width: usize, height: usize) -> Result<(usize, usize, usize, usize)> {
        let f = self.vae_scale();
        if width == 0 || height == 0 || !width.is_multiple_of(f) || !height.is_multiple_of(f) {
            bail!("width and height must be positive multiples of {f}, got {width}x{height}");
        }
        Ok((1, self.unet.config().in_channels, height / f, width / f))
    }

    /// Latents → images `[B, 3, H, W]` in `[0, 1]`, in the VAE's dtype, one image at a time
    /// (the activations of one image in memory; the same result), in tiles when
    /// [`Self::vae_tiling`] is set.
    pub fn decode(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let z = self.vae.unscale(latents)?;
        let images = match self.vae_tiling {
            true => (0..z.dim(0)?).map(|i| self.vae.decode_tiled(&z.narrow(0, i, 1)?)).collect::<candle_core::Result<Vec<_>>>()?,
            false => vec![self.vae.decode_sliced(&z)?],
        };
        to_pixels(&Tensor::cat(&images, 0)?)
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
        let cond = self.conditioning(
            &params.prompt,
            params.negative_prompt.as_deref(),
            params.guidance_scale,
            (params.width, params.height),
            lora,
        )?;
        Ok(Sampler {
            scheduler: params.scheduler.build(&self.scheduler_config, params.steps, params.eta)?,
            rng: NoiseRng::new(params.seed),
            cond,
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
            let eps = guided_noise_pred(&self.unet, &input, t, &sampler.cond, sampler.guidance_scale, lora)?;
            latents = sampler.scheduler.step(&eps, i, &latents, &mut sampler.rng)?;
            latents = blend(sampler.scheduler.as_ref(), i, latents)?;
            on_step(i + 1 - start, timesteps.len() - start)?;
        }
        Ok(latents)
    }
}

/// The VAE's output (about `[-1, 1]`) as pixel values in `[0, 1]`.
pub fn to_pixels(decoded: &Tensor) -> candle_core::Result<Tensor> {
    ((decoded / 2.0)? + 0.5)?.clamp(0.0, 1.0)
}

/// Checks that SDXL's two text encoders fit its UNet: the concatenated hidden states are the
/// cross-attention width, and the pooled projection plus six time-id features are
/// `projection_class_embeddings_input_dim`.
fn check_sdxl(unet: &UNetConfig, te1: &ClipTextModel, te2: &ClipTextModel) -> Result<()> {
    let Some(projection) = te2.projection_dim() else {
        bail!("text_encoder_2 has no text_projection (SDXL needs a CLIPTextModelWithProjection)");
    };
    let hidden = te1.hidden_size() + te2.hidden_size();
    if hidden != unet.cross_attention_dim {
        bail!("the text encoders' hidden sizes add up to {hidden}, but the UNet's cross_attention_dim is {}", unet.cross_attention_dim);
    }
    let time = unet.addition_time_embed_dim.unwrap_or(0);
    let added = projection + 6 * time;
    if Some(added) != unet.projection_class_embeddings_input_dim {
        bail!(
            "text_encoder_2's projection_dim {projection} plus 6 × addition_time_embed_dim {time} is {added}, but the UNet's projection_class_embeddings_input_dim is {:?}",
            unet.projection_class_embeddings_input_dim
        );
    }
    Ok(())
}

/// A sampling loop's state: scheduler, seeded noise stream, text embeddings and guidance.
pub struct Sampler {
    pub scheduler: Box<dyn Scheduler>,
    pub rng: NoiseRng,
    /// The text conditions: batch 2 (negative first) with guidance, else 1.
    pub cond: Conditioning,
    pub guidance_scale: f64,
}
