//! sdserve: Stable Diffusion inference with per-request LoRA adapters and AlignProp reward
//! fine-tuning, on candle.
//!
//! - [`model`]: diffusers-exact model code (UNet, VAE, CLIP) built from differentiable ops.
//! - [`lora`]: LoRA adapter files, per-request delta sets and trainable adapters.
//! - [`engine`]: schedulers, seeded noise and the text-to-image pipeline.

pub mod engine;
pub mod lora;
pub mod model;
pub mod dataset;
pub mod eval;
