//! AlignProp: reward backpropagation through the last denoising steps into LoRA weights.
//!
//! - [`backprop`]: truncated backprop through a batch of DDIM trajectories, full-graph and
//!   layer-by-layer recompute ([`chain`]: chained vector-Jacobian products).
//! - [`trainer`]: the training loop (AdamW and clipping from [`crate::optim`]);
//!   [`validation`]: keeping the best state on a validation set.
//! - [`request`] and [`prompts`]: the job request and built-in prompt sets.
//! - [`jobs`]: persisted background jobs with events and cancellation; [`runner`]: one run,
//!   from request to saved adapter.

pub mod backprop;
pub mod chain;
pub mod jobs;
pub mod prompts;
pub mod request;
pub mod runner;
pub mod targets;
pub mod trainer;
pub mod validation;

pub use targets::attention_targets;
