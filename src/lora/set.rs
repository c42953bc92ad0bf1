//! The LoRA deltas active for one forward pass, keyed by module path.

use std::collections::HashMap;

use candle_core::Tensor;

use super::dora::Dora;
use super::update::Update;
use super::Component;

/// One adapter's update of a module's weight: `scale · ΔW`, renormalised by DoRA when the
/// module is weight-decomposed. `scale` folds together the request weight and `alpha / rank`.
#[derive(Clone, Debug)]
pub struct LoraDelta {
    pub update: Update,
    pub scale: f64,
    pub dora: Option<Dora>,
}

impl LoraDelta {
    /// A low-rank update `scale · up · down`: `down` is `[rank, in]` (or `[rank, in, kh, kw]`
    /// for a convolution) and `up` is `[out, rank]` (or `[out, rank, 1, 1]`).
    pub fn low_rank(down: Tensor, up: Tensor, scale: f64) -> Self {
        Self { update: Update::LowRank { down, up }, scale, dora: None }
    }
}

/// The deltas applied in one forward pass of one model component. Building a set never
/// touches the base weights, so a request sees exactly the adapters it names.
#[derive(Clone, Debug, Default)]
pub struct LoraSet {
    deltas: HashMap<String, Vec<LoraDelta>>,
}

impl LoraSet {
    /// The deltas for the module at `path` (e.g. `down_blocks.0.attentions.0.proj_in`).
    pub fn get(&self, path: &str) -> &[LoraDelta] {
        if self.deltas.is_empty() {
            return &[];
        }
        self.deltas.get(path).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn push(&mut self, path: impl Into<String>, delta: LoraDelta) {
        self.deltas.entry(path.into()).or_default().push(delta);
    }

    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// Number of modules that carry at least one delta.
    pub fn num_modules(&self) -> usize {
        self.deltas.len()
    }
}

/// Per-component LoRA sets for one pipeline call.
#[derive(Clone, Debug, Default)]
pub struct PipelineLora {
    pub unet: LoraSet,
    pub text_encoder: LoraSet,
    /// SDXL's second text encoder.
    pub text_encoder_2: LoraSet,
}

impl PipelineLora {
    /// The set of one component.
    pub fn component(&self, component: Component) -> &LoraSet {
        match component {
            Component::Unet => &self.unet,
            Component::TextEncoder => &self.text_encoder,
            Component::TextEncoder2 => &self.text_encoder_2,
        }
    }

    pub fn component_mut(&mut self, component: Component) -> &mut LoraSet {
        match component {
            Component::Unet => &mut self.unet,
            Component::TextEncoder => &mut self.text_encoder,
            Component::TextEncoder2 => &mut self.text_encoder_2,
        }
    }
}

impl LoraSet {
    /// A shared empty set, for components that run without adapters.
    pub fn none() -> &'static LoraSet {
        static NONE: std::sync::OnceLock<LoraSet> = std::sync::OnceLock::new();
        NONE.get_or_init(LoraSet::default)
    }
}
