//! sdserve: Stable Diffusion inference with per-request LoRA adapters and AlignProp reward
//! fine-tuning, on candle.
//!
//! - [`model`]: diffusers-exact model code (UNet, VAE, CLIP) built from differentiable ops.
//! - [`lora`]: LoRA adapter files, per-request delta sets and trainable adapters.
//! - [`engine`]: schedulers, guidance and the text-to-image pipeline.
//! - [`noise`] and [`optim`]: seeded Gaussian noise and AdamW, shared by every layer above.
//! - [`align`] and [`rewards`]: AlignProp training and the rewards it maximises.
//! - [`dataset`] and [`eval`]: the procedural shapes data and its analytic evaluator.
//! - [`stores`]: jobs, the adapter registry and adapter blobs, shared by every process.
//! - [`server`] and [`cli`]: the HTTP API and the subcommands.

pub mod align;
pub mod dataset;
pub mod engine;
pub mod eval;
pub mod lora;
pub mod memory;
pub mod model;
pub mod noise;
pub mod optim;
pub mod pretrain;
pub mod rewards;
pub mod server;
pub mod stores;
pub mod tensor_file;
pub mod cli;

/// The embedded default model: a small SD-architecture model trained by this project
/// (see `sdserve pretrain`), used when no `--model` is given.
pub const DEFAULT_MODEL_DIR: &str = "models/default";
