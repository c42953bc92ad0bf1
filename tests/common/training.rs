//! The fixture model parts the training tests need, loaded in any dtype.
#![allow(dead_code)]

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sdserve::model::unet::{AddedConditions, Conditioning};

use crate::common::{components, components_of, fixture_dir, sdxl_fixture_dir};

/// The fixture UNet, VAE and scheduler config loaded in `dtype`, for the training tests.
pub struct TrainingFixture {
    pub unet: sdserve::model::unet::UNet2DConditionModel,
    pub vae: sdserve::model::vae::AutoencoderKL,
    pub scheduler: sdserve::model::config::SchedulerConfig,
    pub targets: sdserve::lora::LoraTargets,
    /// Batch 2 (empty prompt first).
    pub cond: Conditioning,
    /// The VAE's `scaling_factor`.
    pub scaling: f64,
}

fn load(dir: &Path, dtype: DType, cond: Conditioning) -> TrainingFixture {
    use sdserve::model::config::{read_json, VaeConfig};
    use sdserve::model::weights::open;
    let unet_file = dir.join("unet/diffusion_pytorch_model.safetensors");
    let vae_file = dir.join("vae/diffusion_pytorch_model.safetensors");
    let unet = sdserve::model::unet::UNet2DConditionModel::new(
        open(&unet_file, dtype, &Device::Cpu).unwrap(),
        &read_json(&dir.join("unet/config.json")).unwrap(),
    )
    .unwrap();
    let vae_cfg: VaeConfig = read_json(&dir.join("vae/config.json")).unwrap();
    let vae = sdserve::model::vae::AutoencoderKL::new(open(&vae_file, dtype, &Device::Cpu).unwrap(), &vae_cfg).unwrap();
    let targets =
        sdserve::lora::LoraTargets::from_files(&unet_file, &dir.join("text_encoder/model.safetensors")).unwrap();
    TrainingFixture {
        unet,
        vae,
        scheduler: read_json(&dir.join("scheduler/scheduler_config.json")).unwrap(),
        targets,
        cond: cond.to_dtype(dtype).unwrap(),
        scaling: vae_cfg.scaling_factor,
    }
}

/// The SD 1.x fixture with diffusers' `[2, 77, 32]` text embeddings.
pub fn training_fixture(dtype: DType) -> TrainingFixture {
    load(&fixture_dir(), dtype, Conditioning::text(components()["text_embeddings"].clone()))
}

/// The SDXL fixture with diffusers' prompt and pooled embeddings (empty negative prompt) and
/// the time ids of a 64×64 image.
pub fn sdxl_training_fixture(dtype: DType) -> TrainingFixture {
    let refs = components_of(&sdxl_fixture_dir());
    let cat = |a: &str, b: &str| Tensor::cat(&[&refs[a], &refs[b]], 0).unwrap();
    let time_ids = Tensor::new(&[[64f32, 64.0, 0.0, 0.0, 64.0, 64.0]; 2], &Device::Cpu).unwrap();
    let cond = Conditioning {
        context: cat("negative_prompt_embeds", "prompt_embeds"),
        added: Some(AddedConditions { text_embeds: cat("negative_pooled_prompt_embeds", "pooled_prompt_embeds"), time_ids }),
    };
    load(&sdxl_fixture_dir(), dtype, cond)
}
