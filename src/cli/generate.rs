//! `sdserve generate`: one image from the command line, with a progress bar.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::{DeviceArgs, LoraArg};
use crate::engine::image::{encode, to_rgb, OutputFormat};
use crate::noise::random_seed;
use crate::engine::pipeline::GenerateParams;
use crate::engine::scheduler::SchedulerKind;
use crate::lora::{LoraAdapter, PipelineLora};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// diffusers-layout model folder.
    #[arg(long, env = "SDSERVE_MODEL", default_value = crate::DEFAULT_MODEL_DIR)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    /// Left out: the empty prompt, or zero embeddings for SDXL (`force_zeros_for_empty_prompt`).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Random when omitted (the seed used is printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Defaults to the model's native size (UNet sample size × VAE scale factor).
    #[arg(long)]
    pub width: Option<usize>,
    /// Defaults to the model's native size.
    #[arg(long)]
    pub height: Option<usize>,
    /// ddim, euler, euler_a, dpmpp_2m or dpmpp_2m_karras.
    #[arg(long, default_value = "ddim")]
    pub scheduler: SchedulerKind,
    /// DDIM eta (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// A LoRA adapter as FILE[:WEIGHT]; repeatable.
    #[arg(long = "lora")]
    pub loras: Vec<LoraArg>,
    /// A safetensors file whose single tensor is the initial noise `[1, C, h, w]`.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Output file; the format follows the extension (png, jpg, webp).
    #[arg(short, long, default_value = "out.png")]
    pub output: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let sd = args.device.load(&args.model)?;
    let device = sd.device.clone();
    let mut lora = PipelineLora::default();
    for l in &args.loras {
        LoraAdapter::from_file(&l.path, &sd.lora_targets, &device)?.add_to(l.weight, &mut lora);
    }
    let latents = match &args.latents {
        Some(p) => {
            let tensors = candle_core::safetensors::load(p, &device)?;
            let first = tensors.into_values().next();
            Some(first.with_context(|| format!("{} holds no tensor", p.display()))?)
        }
        None => None,
    };
    let seed = args.seed.unwrap_or_else(random_seed);
    let params = GenerateParams {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        steps: args.steps,
        guidance_scale: args.guidance,
        seed,
        width: args.width.unwrap_or(sd.native_size()),
        height: args.height.unwrap_or(sd.native_size()),
        scheduler: args.scheduler,
        eta: args.eta,
        latents,
    };
    let bar = ProgressBar::new(params.steps as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps [{elapsed_precise}<{eta_precise}]")
            .expect("valid template"),
    );
    let image = sd.generate(&params, &lora, &mut |done, _| {
        bar.set_position(done as u64);
        Ok(())
    })?;
    bar.finish_and_clear();
    let ext = args.output.extension().and_then(|e| e.to_str()).unwrap_or("png");
    let format: OutputFormat = ext.parse()?;
    std::fs::write(&args.output, encode(&to_rgb(&image)?, format, 90)?)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    eprintln!("seed {seed} → {}", args.output.display());
    Ok(())
}
