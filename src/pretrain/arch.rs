//! The architecture of the embedded default model: a small SD 1.x-style pipeline for 64×64
//! images, written with the same config files diffusers and transformers write.
//!
//! Sized for CPU training in about an hour: a VAE with 4× downsampling (16×16×4 latents, no
//! mid-block attention so it can train on crops) and a two-level UNet whose cross-attention
//! sits at 8×8 and in the mid block (see `benches` and the README for timings).

use serde_json::{json, Value};

/// Image side in pixels.
pub const IMAGE_SIZE: usize = 64;
/// Padded caption length (bos + up to 18 tokens + eos; the longest caption has 15 tokens).
pub const MAX_TOKENS: usize = 20;
/// Text embedding width, also the UNet's cross-attention width.
pub const TEXT_DIM: usize = 64;

pub fn vae_config() -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.30.0",
        "act_fn": "silu",
        "block_out_channels": [16, 32, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": IMAGE_SIZE,
        "scaling_factor": 1.0,
        "force_upcast": true,
        "mid_block_add_attention": false,
        "use_quant_conv": true,
        "use_post_quant_conv": true
    })
}

pub fn unet_config() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.30.0",
        "act_fn": "silu",
        "attention_head_dim": 4,
        "block_out_channels": [32, 64],
        "center_input_sample": false,
        "cross_attention_dim": TEXT_DIM,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 16,
        "sample_size": IMAGE_SIZE / 4,
        "use_linear_projection": false,
        "upcast_attention": false,
        "only_cross_attention": false,
        "dual_cross_attention": false,
        "resnet_time_scale_shift": "default",
        "time_embedding_type": "positional"
    })
}

pub fn text_encoder_config(vocab_size: usize) -> Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": TEXT_DIM,
        "intermediate_size": TEXT_DIM * 4,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TOKENS,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": TEXT_DIM,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
        "torch_dtype": "float32"
    })
}

/// SD 1.x's DDIM scheduler config.
pub fn scheduler_config() -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.30.0",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null
    })
}

pub fn model_index() -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "feature_extractor": [null, null],
        "safety_checker": [null, null],
        "requires_safety_checker": false,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    })
}
