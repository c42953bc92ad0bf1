//! LoRA adapters: the per-forward delta sets, adapter files (diffusers/peft and kohya) and
//! trainable adapters.

mod set;
// mod trainable; (pending)

pub use set::{LoraDelta, LoraSet, PipelineLora};
// pub use trainable::{TrainableLora, TrainableModule};
