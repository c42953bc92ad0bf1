//! Model code in the diffusers / transformers layouts: same module paths, key names and
//! numerics, built only from ops that have a backward pass.

pub mod clip;
pub mod config;
pub mod nn;
pub mod ops;
pub mod staged;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod vae_tiling;
pub mod weights;
