//! Training the embedded default model from scratch on the procedural shapes dataset:
//! tokenizer → VAE → text encoder + UNet, saved as a diffusers-layout folder; and [`sd15`],
//! an untrained SD 1.5-architecture pipeline for real-scale benchmarks.

mod arch;
pub mod checkpoint;
mod data;
mod diffusion_stage;
mod params;
pub mod sd15;
mod vae_stage;
mod vocab;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};

pub use arch::IMAGE_SIZE;
pub use params::Params;

use crate::model::config::{read_json, VaeConfig};
use crate::model::vae::AutoencoderKL;

/// `sdserve pretrain` options.
#[derive(clap::Args, Debug, Clone)]
pub struct PretrainArgs {
    /// Output model folder (resumes when it holds a partial run).
    #[arg(long, default_value = crate::DEFAULT_MODEL_DIR)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 800)]
    pub vae_steps: usize,
    #[arg(long, default_value_t = 8)]
    pub vae_batch: usize,
    /// Side of the random crops the VAE trains on.
    #[arg(long, default_value_t = 32)]
    pub vae_crop: usize,
    #[arg(long, default_value_t = 10500)]
    pub unet_steps: usize,
    /// The last UNet steps, over which the learning rate falls linearly to a tenth.
    #[arg(long, default_value_t = 3000)]
    pub unet_decay_steps: usize,
    #[arg(long, default_value_t = 16)]
    pub unet_batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)?).with_context(|| format!("cannot write {}", path.display()))
}

/// A progress bar for a training stage named `prefix`.
pub(crate) fn progress_bar(prefix: &'static str) -> ProgressBar {
    ProgressBar::new(0).with_prefix(prefix).with_style(
        ProgressStyle::with_template("{prefix:>5} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .expect("valid template"),
    )
}

/// Runs every stage that is not finished yet.
pub fn run(args: &PretrainArgs) -> Result<()> {
    let out = &args.out;
    let device = Device::Cpu;
    vocab::write_tokenizer(&out.join("tokenizer"), &crate::dataset::VOCABULARY, arch::MAX_TOKENS)?;
    write_json(&out.join("model_index.json"), &arch::model_index())?;
    write_json(&out.join("scheduler/scheduler_config.json"), &arch::scheduler_config())?;
    let vocab_size = vocab::vocab_size(&out.join("tokenizer"))?;
    write_json(&out.join("text_encoder/config.json"), &arch::text_encoder_config(vocab_size))?;
    write_json(&out.join("unet/config.json"), &arch::unet_config())?;
    let vae_dir = out.join("vae");
    if !vae_dir.join("config.json").is_file() {
        write_json(&vae_dir.join("config.json"), &arch::vae_config())?;
    }

    let vae_opts = vae_stage::VaeStage { steps: args.vae_steps, batch: args.vae_batch, lr: args.lr, kl_weight: 1e-6, crop: args.vae_crop, seed: args.seed };
    let b = progress_bar("vae");
    vae_stage::train(&vae_dir, &vae_opts, &device, &b)?;
    b.finish();

    // The latent scale is fixed once, from the trained encoder (as SD's 0.18215).
    let mut vae_cfg: serde_json::Value = read_json(&vae_dir.join("config.json"))?;
    if vae_cfg["scaling_factor"] == 1.0 {
        let parsed: VaeConfig = serde_json::from_value(vae_cfg.clone())?;
        let weights = vae_dir.join("diffusion_pytorch_model.safetensors");
        let vae = AutoencoderKL::new(crate::model::weights::open(&weights, DType::F32, &device)?, &parsed)?;
        let s = vae_stage::scaling_factor(&vae, args.seed, &device)?;
        vae_cfg["scaling_factor"] = serde_json::json!((s * 1e5).round() / 1e5);
        write_json(&vae_dir.join("config.json"), &vae_cfg)?;
    }

    let opts = diffusion_stage::DiffusionStage {
        steps: args.unet_steps,
        batch: args.unet_batch,
        lr: args.lr,
        decay_steps: args.unet_decay_steps,
        caption_dropout: 0.1,
        seed: args.seed,
    };
    let b = progress_bar("unet");
    diffusion_stage::train(out, &opts, &device, &b)?;
    b.finish();
    Ok(())
}
