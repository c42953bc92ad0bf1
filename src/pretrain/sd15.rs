//! An untrained pipeline of the Stable Diffusion 1.5 architecture (UNet [320, 640, 1280, 1280],
//! CLIP ViT-L/14's text encoder, the SD VAE) with seeded random weights, written as a
//! diffusers folder: real-scale benchmarks need no download, and diffusers loads the same
//! weights.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde_json::{json, Value};

use super::params::Params;
use super::{arch, vocab, write_json};
use crate::model::clip::ClipTextModel;
use crate::model::config::{ClipTextConfig, UNetConfig, VaeConfig};
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;

/// The words the benchmark prompts use (any other text still tokenizes, byte by byte).
const WORDS: [&str; 12] = ["a", "photo", "of", "an", "astronaut", "riding", "horse", "on", "the", "moon", "red", "cat"];

/// SD 1.5's `unet/config.json`.
pub fn unet_config() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.30.0",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": false,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    })
}

/// SD 1.5's `vae/config.json`.
pub fn vae_config() -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.30.0",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215
    })
}

/// CLIP ViT-L/14's text tower (`openai/clip-vit-large-patch14`), with the special-token ids
/// of the written tokenizer, whose vocabulary is smaller than the embedding table.
pub fn text_encoder_config(bos: usize, eos: usize) -> Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "torch_dtype": "float32"
    })
}

/// Builds one component from freshly initialised parameters and saves them under its keys.
fn write_weights(path: &Path, seed: u64, build: impl FnOnce(VarBuilder<'static>) -> Result<()>) -> Result<()> {
    let params = Params::new(seed);
    build(params.var_builder(DType::F32, &Device::Cpu))?;
    params.save(path)
}

/// Writes the pipeline into `out` (f32 weights, PyTorch's default initialisation drawn from
/// `seed`; about 4.3 GB). One component is in memory at a time.
pub fn write_random(out: &Path, seed: u64) -> Result<()> {
    vocab::write_tokenizer(&out.join("tokenizer"), &WORDS, 77)?;
    let vocab_size = vocab::vocab_size(&out.join("tokenizer"))?;
    write_json(&out.join("model_index.json"), &arch::model_index())?;
    write_json(&out.join("scheduler/scheduler_config.json"), &arch::scheduler_config())?;
    let te = text_encoder_config(vocab_size - 2, vocab_size - 1);
    let unet = unet_config();
    let vae = vae_config();
    for (dir, cfg) in [("text_encoder", &te), ("unet", &unet), ("vae", &vae)] {
        write_json(&out.join(dir).join("config.json"), cfg)?;
    }

    let te_cfg: ClipTextConfig = serde_json::from_value(te)?;
    write_weights(&out.join("text_encoder/model.safetensors"), seed, |vb| {
        ClipTextModel::new(vb, &te_cfg)?;
        Ok(())
    })?;
    let unet_cfg: UNetConfig = serde_json::from_value(unet)?;
    write_weights(&out.join("unet/diffusion_pytorch_model.safetensors"), seed + 1, |vb| {
        UNet2DConditionModel::new(vb, &unet_cfg)?;
        Ok(())
    })?;
    let vae_cfg: VaeConfig = serde_json::from_value(vae)?;
    write_weights(&out.join("vae/diffusion_pytorch_model.safetensors"), seed + 2, |vb| {
        AutoencoderKL::new(vb, &vae_cfg)?;
        Ok(())
    })
}
