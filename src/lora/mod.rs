//! LoRA adapters: the per-forward delta sets, adapter files (diffusers/peft and kohya) and
//! trainable adapters.

mod set;

pub use set::{LoraDelta, LoraSet, PipelineLora};
