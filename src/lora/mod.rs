//! LoRA adapters: the per-forward delta sets, adapter files (diffusers/peft and kohya) and
//! trainable adapters.

mod adapter;
mod save;
mod set;
mod sgm;
mod targets;
mod trainable;

pub use adapter::{LoraAdapter, LoraFormat, LoraModule};
pub use save::save_diffusers;
pub use set::{LoraDelta, LoraSet, PipelineLora};
pub use targets::{Component, LoraTargets};
pub use trainable::{TrainableLora, TrainableModule};
