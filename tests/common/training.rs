//! The fixture model parts the training tests need, loaded in any dtype.

use candle_core::Device;
use sdserve::model::unet::Conditioning;

use crate::common::{components, fixture_dir};

/// The fixture UNet, VAE and scheduler config loaded in `dtype`, for the training tests.
pub struct TrainingFixture {
    pub unet: sdserve::model::unet::UNet2DConditionModel,
    pub vae: sdserve::model::vae::AutoencoderKL,
    pub scheduler: sdserve::model::config::SchedulerConfig,
    pub targets: sdserve::lora::LoraTargets,
    /// `[2, 77, 32]` text embeddings (empty prompt first).
    pub cond: Conditioning,
}

pub fn training_fixture(dtype: candle_core::DType) -> TrainingFixture {
    use sdserve::model::config::read_json;
    use sdserve::model::weights::open;
    let dir = fixture_dir();
    let unet_file = dir.join("unet/diffusion_pytorch_model.safetensors");
    let vae_file = dir.join("vae/diffusion_pytorch_model.safetensors");
    let unet = sdserve::model::unet::UNet2DConditionModel::new(
        open(&unet_file, dtype, &Device::Cpu).unwrap(),
        &read_json(&dir.join("unet/config.json")).unwrap(),
    )
    .unwrap();
    let vae = sdserve::model::vae::AutoencoderKL::new(
        open(&vae_file, dtype, &Device::Cpu).unwrap(),
        &read_json(&dir.join("vae/config.json")).unwrap(),
    )
    .unwrap();
    let targets =
        sdserve::lora::LoraTargets::from_files(&unet_file, &dir.join("text_encoder/model.safetensors")).unwrap();
    TrainingFixture {
        unet,
        vae,
        scheduler: read_json(&dir.join("scheduler/scheduler_config.json")).unwrap(),
        targets,
        cond: Conditioning::text(components()["text_embeddings"].to_dtype(dtype).unwrap()),
    }
}
