//! AlignProp: reward backpropagation through the last denoising steps into LoRA weights.

pub mod backprop;
pub mod optim;
pub mod trainer;
