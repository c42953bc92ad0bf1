//! The modules of a base model that a LoRA adapter may target, with their weight shapes.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::Metadata;
use serde::{Deserialize, Serialize};

/// Largest safetensors header read (the format's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// The text encoders' module paths start with this, whether or not their weight files do
/// (transformers ≥ 5 saves `CLIPTextModel` without it), as in `model::clip`.
const TEXT_MODEL_PREFIX: &str = "text_model.";
/// The projection of `CLIPTextModelWithProjection`, which sits outside `text_model`.
const TEXT_PROJECTION: &str = "text_projection";

/// A model component that adapters can modify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder.
    #[serde(rename = "text_encoder_2")]
    TextEncoder2,
}

impl Component {
    /// The diffusers name, also the adapter key prefix (`unet`, `text_encoder`, `text_encoder_2`).
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One component's adaptable modules.
#[derive(Clone, Debug, Default)]
struct ComponentTargets {
    /// Module path → base weight shape (`[out, in]` or `[out, in, kh, kw]`).
    shapes: BTreeMap<String, Vec<usize>>,
    /// Kohya's underscored module name → module path.
    underscored: HashMap<String, String>,
    /// The prefix every module path of the tower starts with (`text_model.`), which adapter
    /// keys may leave out; empty for the UNet.
    prefix: &'static str,
}

impl ComponentTargets {
    /// Builds the targets from tensor names and shapes: every 2-D or 4-D `<path>.weight`
    /// except embedding tables. `prefix` is prepended to the paths of a file that stores
    /// them without it (except `text_projection`, outside the tower).
    fn new<S: AsRef<str>>(
        tensors: impl IntoIterator<Item = (S, Vec<usize>)>,
        prefix: &'static str,
    ) -> Self {
        let tensors: Vec<_> = tensors.into_iter().collect();
        let has_prefix = tensors
            .iter()
            .any(|(name, _)| name.as_ref().starts_with(prefix));
        let mut shapes = BTreeMap::new();
        for (name, shape) in tensors {
            let Some(path) = name.as_ref().strip_suffix(".weight") else {
                continue;
            };
            let last = path.rsplit('.').next().unwrap_or(path);
            if !matches!(shape.len(), 2 | 4) || last.ends_with("embedding") {
                continue;
            }
            let add = if has_prefix || path == TEXT_PROJECTION { "" } else { prefix };
            shapes.insert(format!("{add}{path}"), shape);
        }
        let underscored = shapes
            .keys()
            .map(|p| (p.replace('.', "_"), p.clone()))
            .collect();
        Self {
            shapes,
            underscored,
            prefix,
        }
    }

    /// The module path and shape for `path`, with or without the tower prefix.
    fn resolve(&self, path: &str) -> Option<(&str, &[usize])> {
        let found = self.shapes.get_key_value(path).or_else(|| {
            let prefixed = format!("{}{path}", self.prefix);
            (!self.prefix.is_empty())
                .then(|| self.shapes.get_key_value(&prefixed))
                .flatten()
        });
        found.map(|(p, s)| (p.as_str(), s.as_slice()))
    }

    /// The module path for an underscored name, with or without the tower prefix.
    fn underscored_path(&self, name: &str) -> Option<&str> {
        let found = self.underscored.get(name).or_else(|| {
            let prefixed = format!("{}{name}", self.prefix.replace('.', "_"));
            (!self.prefix.is_empty())
                .then(|| self.underscored.get(&prefixed))
                .flatten()
        });
        found.map(String::as_str)
    }
}

/// For each component, the module path → base weight shape of every linear and
/// convolution layer, read from the base model's safetensors headers.
///
/// UNet paths are as in diffusers (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`),
/// text encoder paths as in transformers (`text_model.encoder.layers.0.self_attn.q_proj`).
#[derive(Clone, Debug, Default)]
pub struct LoraTargets {
    unet: ComponentTargets,
    text_encoder: ComponentTargets,
    text_encoder_2: ComponentTargets,
}

impl LoraTargets {
    /// Reads the tensor shapes from the headers of the UNet and text encoder weight files
    /// (the tensor data is not loaded).
    pub fn from_files(unet: &Path, text_encoder: &Path) -> Result<Self> {
        Ok(Self::from_tensors(
            read_shapes(unet)?,
            read_shapes(text_encoder)?,
        ))
    }

    /// Adds SDXL's second text encoder from its weight file's header.
    pub fn with_text_encoder_2(mut self, text_encoder_2: &Path) -> Result<Self> {
        self.text_encoder_2 = ComponentTargets::new(read_shapes(text_encoder_2)?, TEXT_MODEL_PREFIX);
        Ok(self)
    }

    /// Builds the targets from `(tensor name, shape)` lists, as they appear in the weight files.
    pub fn from_tensors<U, T, S>(unet: U, text_encoder: T) -> Self
    where
        U: IntoIterator<Item = (S, Vec<usize>)>,
        T: IntoIterator<Item = (S, Vec<usize>)>,
        S: AsRef<str>,
    {
        Self {
            unet: ComponentTargets::new(unet, ""),
            text_encoder: ComponentTargets::new(text_encoder, TEXT_MODEL_PREFIX),
            text_encoder_2: ComponentTargets::default(),
        }
    }

    fn component(&self, component: Component) -> &ComponentTargets {
        match component {
            Component::Unet => &self.unet,
            Component::TextEncoder => &self.text_encoder,
            Component::TextEncoder2 => &self.text_encoder_2,
        }
    }

    /// Whether the model has the component (SD 1.x / 2.x have no `text_encoder_2`).
    pub fn has(&self, component: Component) -> bool {
        !self.component(component).shapes.is_empty()
    }

    /// The base weight shape of the module at `path`, if the model has one.
    pub fn shape(&self, component: Component, path: &str) -> Option<&[usize]> {
        self.component(component)
            .shapes
            .get(path)
            .map(Vec::as_slice)
    }

    /// The module path and base weight shape an adapter key's `path` names. Text encoder
    /// paths may leave out `text_model.` (the key form transformers ≥ 5 writes).
    pub fn resolve(&self, component: Component, path: &str) -> Option<(&str, &[usize])> {
        self.component(component).resolve(path)
    }

    /// The module path for kohya's underscored name (`down_blocks_0_attentions_0_proj_in`;
    /// text encoders' with or without `text_model_`).
    pub fn from_underscored(&self, component: Component, name: &str) -> Option<&str> {
        self.component(component).underscored_path(name)
    }

    /// Resnets per UNet down block (diffusers' `layers_per_block`), counted in down block 0.
    pub fn unet_layers_per_block(&self) -> usize {
        let prefix = "down_blocks.0.resnets.";
        let resnets = self.unet.shapes.range(prefix.to_string()..).take_while(|(p, _)| p.starts_with(prefix));
        resnets.filter(|(p, _)| p.ends_with(".conv1")).count()
    }

    /// All modules of `component` with their base weight shapes, sorted by path.
    pub fn modules(&self, component: Component) -> impl Iterator<Item = (&str, &[usize])> {
        self.component(component)
            .shapes
            .iter()
            .map(|(p, s)| (p.as_str(), s.as_slice()))
    }
}

/// The `(name, shape)` of every tensor in a safetensors file, from its header alone.
fn read_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let corrupt = || format!("corrupt safetensors header in {}", path.display());
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let file_len = file.metadata()?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).with_context(corrupt)?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || 8 + n > file_len {
        bail!("{}: header length {n} does not fit the file", corrupt());
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).with_context(corrupt)?;
    let meta: Metadata = serde_json::from_slice(&header).with_context(corrupt)?;
    if (meta.data_len() as u64).checked_add(8 + n) != Some(file_len) {
        bail!(
            "{}: tensor data does not match the file size (truncated?)",
            corrupt()
        );
    }
    Ok(meta
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.shape.clone()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_shapes_and_underscored_names() {
        let targets = LoraTargets::from_tensors(
            [
                (
                    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
                    vec![32, 32],
                ),
                (
                    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.bias",
                    vec![32],
                ),
                ("conv_in.weight", vec![32, 4, 3, 3]),
                ("time_embedding.linear_1.weight", vec![128, 32]),
                ("conv_norm_out.weight", vec![32]),
            ],
            [
                ("encoder.layers.0.self_attn.q_proj.weight", vec![32, 32]),
                ("embeddings.token_embedding.weight", vec![576, 32]),
            ],
        );
        let unet: Vec<_> = targets.modules(Component::Unet).map(|(p, _)| p).collect();
        assert_eq!(
            unet,
            [
                "conv_in",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
                "time_embedding.linear_1"
            ]
        );
        assert_eq!(
            targets.shape(Component::Unet, "conv_in"),
            Some(&[32, 4, 3, 3][..])
        );
        assert_eq!(
            targets.from_underscored(
                Component::Unet,
                "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
            ),
            Some("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0")
        );
        let te: Vec<_> = targets
            .modules(Component::TextEncoder)
            .map(|(p, _)| p)
            .collect();
        assert_eq!(te, ["text_model.encoder.layers.0.self_attn.q_proj"]);
        assert_eq!(
            targets.from_underscored(
                Component::TextEncoder,
                "text_model_encoder_layers_0_self_attn_q_proj"
            ),
            Some("text_model.encoder.layers.0.self_attn.q_proj")
        );

        let prefixed = LoraTargets::from_tensors(
            [("conv_in.weight", vec![32, 4, 3, 3])],
            [
                ("text_model.encoder.layers.0.mlp.fc1.weight", vec![69, 32]),
                ("text_projection.weight", vec![32, 32]),
            ],
        );
        let te: Vec<_> = prefixed
            .modules(Component::TextEncoder)
            .map(|(p, _)| p)
            .collect();
        assert_eq!(
            te,
            ["text_model.encoder.layers.0.mlp.fc1", "text_projection"]
        );
    }

    #[test]
    fn paths_without_the_tower_prefix_resolve() {
        // transformers ≥ 5 layout: no `text_model.` in the file; `text_projection` outside it.
        let targets = LoraTargets::from_tensors(
            [("conv_in.weight", vec![32, 4, 3, 3])],
            [
                ("encoder.layers.0.self_attn.q_proj.weight", vec![32, 32]),
                ("text_projection.weight", vec![16, 32]),
            ],
        );
        let te: Vec<_> = targets.modules(Component::TextEncoder).map(|(p, _)| p).collect();
        assert_eq!(te, ["text_model.encoder.layers.0.self_attn.q_proj", "text_projection"]);
        let q = Some(("text_model.encoder.layers.0.self_attn.q_proj", &[32, 32][..]));
        assert_eq!(targets.resolve(Component::TextEncoder, "encoder.layers.0.self_attn.q_proj"), q);
        assert_eq!(targets.resolve(Component::TextEncoder, "text_model.encoder.layers.0.self_attn.q_proj"), q);
        assert_eq!(targets.resolve(Component::TextEncoder, "text_projection"), Some(("text_projection", &[16, 32][..])));
        assert_eq!(
            targets.from_underscored(Component::TextEncoder, "encoder_layers_0_self_attn_q_proj"),
            Some("text_model.encoder.layers.0.self_attn.q_proj")
        );
        // The UNet has no prefix to leave out; a model without a second text encoder has no targets there.
        assert_eq!(targets.resolve(Component::Unet, "in"), None);
        assert!(targets.has(Component::TextEncoder) && !targets.has(Component::TextEncoder2));
    }
}
