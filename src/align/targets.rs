//! Which UNet layers AlignProp trains: `to_q`, `to_k`, `to_v` and `to_out.0` of every
//! attention module.

use crate::lora::{Component, LoraTargets};

const PROJECTIONS: [&str; 4] = [".to_q", ".to_k", ".to_v", ".to_out.0"];

/// `(module path, in features, out features)` of every attention projection of the UNet.
pub fn attention_targets(targets: &LoraTargets) -> Vec<(String, usize, usize)> {
    targets
        .modules(Component::Unet)
        .filter(|(path, shape)| {
            shape.len() == 2
                && (path.contains(".attn1.") || path.contains(".attn2."))
                && PROJECTIONS.iter().any(|p| path.ends_with(p))
        })
        .map(|(path, shape)| (path.to_string(), shape[1], shape[0]))
        .collect()
}
