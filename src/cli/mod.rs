//! Command-line interface: one module per subcommand, and the shared argument types.

pub mod align;
pub mod evaluate;
pub mod generate;
pub mod serve;

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand};

use crate::engine::pipeline::StableDiffusion;

/// Stable Diffusion server with per-request LoRA adapters and AlignProp fine-tuning.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate one image from a prompt.
    Generate(generate::GenerateArgs),
    /// Fine-tune a LoRA adapter with AlignProp (reward backpropagation), offline.
    Align(align::AlignArgs),
    /// Measure prompt following of a shapes model on held-out captions (analytic evaluator).
    Evaluate(evaluate::EvaluateArgs),
    /// Serve the HTTP API.
    Serve(crate::server::ServerConfig),
    /// Print the HTTP API's OpenAPI document (JSON).
    Openapi,
    /// Train the embedded default model from scratch (resumable).
    Pretrain(crate::pretrain::PretrainArgs),
    /// Train the object_count reward's counting CNN (resumable).
    TrainCounter(crate::rewards::object_count_train::TrainCounterArgs),
}

impl Cli {
    pub fn run(self) -> Result<()> {
        match self.command {
            Command::Generate(args) => generate::run(args),
            Command::Align(args) => align::run(args),
            Command::Evaluate(args) => evaluate::run(args),
            Command::Pretrain(args) => crate::pretrain::run(&args),
            Command::TrainCounter(args) => crate::rewards::object_count_train::run(&args).map(drop),
            Command::Serve(config) => serve::run(config),
            Command::Openapi => serve::print_openapi(),
        }
    }
}

/// Device and dtype selection shared by the subcommands.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Run on the GPU (needs a build with the `cuda` feature).
    #[arg(long, env = "SDSERVE_CUDA", value_parser = clap::builder::BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub cuda: bool,
    /// Compute precision: f32, f16 or bf16 (f16/bf16 only make sense on a GPU).
    #[arg(long, default_value = "f32", env = "SDSERVE_DTYPE")]
    pub dtype: String,
    /// Decode images in overlapping tiles (as diffusers' `enable_tiling()`): memory of one
    /// tile at any size; seams are blended, so results differ slightly from a full decode.
    #[arg(long, env = "SDSERVE_VAE_TILING", value_parser = clap::builder::BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub vae_tiling: bool,
}

impl DeviceArgs {
    pub fn device(&self) -> Result<Device> {
        if self.cuda {
            Device::new_cuda(0).context("cannot open CUDA device 0")
        } else {
            Ok(Device::Cpu)
        }
    }

    /// Loads the diffusers model folder `dir` on this device, with these settings.
    pub fn load(&self, dir: &std::path::Path) -> Result<StableDiffusion> {
        let mut sd = StableDiffusion::load(dir, &self.device()?, self.dtype()?)?;
        sd.vae_tiling = self.vae_tiling;
        Ok(sd)
    }

    pub fn dtype(&self) -> Result<DType> {
        match self.dtype.as_str() {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "bf16" => Ok(DType::BF16),
            other => anyhow::bail!("unknown dtype {other:?} (expected f32, f16 or bf16)"),
        }
    }
}

/// `FILE:WEIGHT` (weight defaults to 1).
#[derive(Clone, Debug)]
pub struct LoraArg {
    pub path: PathBuf,
    pub weight: f64,
}

impl std::str::FromStr for LoraArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.rsplit_once(':') {
            Some((p, w)) if w.parse::<f64>().is_ok() => {
                Ok(LoraArg { path: p.into(), weight: w.parse().expect("checked") })
            }
            _ => Ok(LoraArg { path: s.into(), weight: 1.0 }),
        }
    }
}
