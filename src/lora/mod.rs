//! LoRA adapters: the per-forward delta sets, adapter files (diffusers/peft and kohya keys;
//! LoRA, LoCon, LyCORIS LoHa / LoKr, DoRA), how deltas are applied, and trainable adapters.

mod adapter;
mod apply;
mod dora;
mod keys;
mod lycoris;
mod module;
mod save;
mod set;
mod sgm;
mod targets;
mod trainable;
mod update;
mod values;

pub use adapter::{LoraAdapter, LoraFormat, LoraModule};
pub use apply::{apply as apply_deltas, Kernel, Layer};
pub use dora::{Dora, DoraAxis};
pub use lycoris::{HadaPair, Hadamard, KronFactor, Kronecker};
pub use save::save_diffusers;
pub use set::{LoraDelta, LoraSet, PipelineLora};
pub use targets::{Component, LoraTargets};
pub use trainable::{TrainableLora, TrainableModule};
pub use update::Update;
