//! Command-line interface: one module per subcommand, and the shared argument types.

pub mod align;
pub mod evaluate;
pub mod generate;
pub mod serve;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

pub use crate::engine::device::DeviceArgs;

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
