//! LoRA adapter files (diffusers, peft and kohya key formats; LoRA, LoCon, LyCORIS LoHa and
//! LoKr, DoRA), parsed and validated against the base model.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::dora::Dora;
use super::keys::{Role, DOTTED as DOTTED_SUFFIXES};
use super::module::{Found, PeftAlpha};
use super::targets::{Component, LoraTargets};
use super::update::Update;
use super::values;
use super::{LoraDelta, PipelineLora};

/// Offending keys listed per problem in an error message.
const MAX_LISTED: usize = 5;

/// The safetensors metadata entry where diffusers stores the peft `LoraConfig`.
const PEFT_METADATA_KEY: &str = "lora_adapter_metadata";

/// The key naming scheme of an adapter file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraFormat {
    /// `unet.<path>.lora.down.weight`, `text_encoder.<path>.lora_linear_layer.down.weight`.
    Diffusers,
    /// `unet.<path>.lora_A.weight` (or `base_model.model.<path>.lora_A.weight`).
    Peft,
    /// `lora_unet_<path_with_underscores>.lora_down.weight`, `lora_te_…` (`lora_te1_…`,
    /// `lora_te2_…` for SDXL's two text encoders; SDXL UNet paths also in the original
    /// `input_blocks_…` naming sd-scripts writes); also LyCORIS's `hada_*` / `lokr_*` /
    /// `lora_mid` / `dora_scale` keys.
    Kohya,
}

impl LoraFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LoraFormat::Diffusers => "diffusers",
            LoraFormat::Peft => "peft",
            LoraFormat::Kohya => "kohya",
        }
    }
}

impl fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One adapted module: the update of its weight is `alpha_scale · ΔW`, renormalised when it
/// carries a DoRA magnitude.
#[derive(Clone, Debug)]
pub struct LoraModule {
    pub component: Component,
    pub path: String,
    /// ΔW in its factored form (f32).
    pub update: Update,
    /// DoRA's magnitude, for a weight-decomposed module.
    pub dora: Option<Dora>,
    /// The alpha the file gives for this module, if any.
    pub alpha: Option<f64>,
    /// `alpha / rank` (1 without an alpha, or for a LoKr of two full factors).
    pub alpha_scale: f64,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.update.rank()
    }
}

/// A parsed adapter whose every module was checked against the base model.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    format: LoraFormat,
    modules: Vec<LoraModule>,
}

/// A tensor key understood as `(format, component, module path, role)`. The format is
/// `None` for the dotted keys (`.alpha`, `.lora_magnitude_vector`) both dotted formats carry.
struct ParsedKey<'k> {
    format: Option<LoraFormat>,
    component: Component,
    path: &'k str,
    /// The base weight shape of the module.
    base: &'k [usize],
    role: Role,
}

/// Why a key was rejected.
enum KeyError {
    Unknown,
    NotInModel,
    /// A key of SDXL's second text encoder for a model without one.
    NoTextEncoder2,
}

/// Offending keys grouped by problem, reported together in one error.
#[derive(Default)]
struct Problems(BTreeMap<&'static str, Vec<String>>);

impl Problems {
    fn add(&mut self, problem: &'static str, key: impl Into<String>) {
        self.0.entry(problem).or_default().push(key.into());
    }

    fn check(&self) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(problem, keys)| {
                let listed = keys
                    .iter()
                    .take(MAX_LISTED)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                let more = keys.len().saturating_sub(MAX_LISTED);
                let more = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                format!("{problem} ({}): {listed}{more}", keys.len())
            })
            .collect();
        bail!("invalid LoRA adapter: {}", parts.join("; "))
    }
}

impl LoraAdapter {
    /// Reads and validates an adapter file.
    pub fn from_file(path: &Path, targets: &LoraTargets, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_bytes(&bytes, targets, device)
            .with_context(|| format!("loading LoRA {}", path.display()))
    }

    /// Parses a safetensors adapter, auto-detecting the key format, and checks every module
    /// against `targets`. Tensors are loaded as f32 on `device`.
    pub fn from_bytes(bytes: &[u8], targets: &LoraTargets, device: &Device) -> Result<Self> {
        let (_, header) =
            SafeTensors::read_metadata(bytes).context("not a valid safetensors file")?;
        let file = SafeTensors::deserialize(bytes).context("not a valid safetensors file")?;
        let peft = PeftConfig::parse(header.metadata())?;

        let mut names = file.names();
        names.sort_unstable();
        let mut problems = Problems::default();
        let mut formats = BTreeMap::<LoraFormat, &str>::new();
        let mut found = BTreeMap::<(Component, &str), Found>::new();
        for name in names {
            let key = match parse_key(name, targets) {
                Ok(key) => key,
                Err(KeyError::Unknown) => {
                    problems.add("unrecognised keys", name);
                    continue;
                }
                Err(KeyError::NotInModel) => {
                    problems.add("modules not in the base model", name);
                    continue;
                }
                Err(KeyError::NoTextEncoder2) => {
                    problems.add("keys for text_encoder_2, which this model does not have (an SDXL adapter on an SD 1.x/2.x model?)", name);
                    continue;
                }
            };
            if let Some(format) = key.format {
                formats.entry(format).or_insert(name);
            }
            let view = file.tensor(name)?;
            let entry = found
                .entry((key.component, key.path))
                .or_insert_with(|| Found::new(key.base));
            if let Some(first) = entry.insert(key.role, name, view) {
                problems.add(
                    "keys given twice for one module",
                    format!("{first} and {name}"),
                );
            }
        }
        // diffusers itself writes both dotted namings in one file (it renames only the
        // attention projections' factors), but kohya keys never come with dotted ones
        if formats.contains_key(&LoraFormat::Kohya) && formats.len() > 1 {
            for (format, key) in &formats {
                problems.add(
                    "keys of different formats mixed",
                    format!("{key} ({format})"),
                );
            }
        }

        let mut checked = Vec::with_capacity(found.len());
        for ((component, path), module) in found {
            match module.check() {
                Ok(kind) => checked.push((component, path, module, kind)),
                Err((problem, detail)) => problems.add(problem, detail),
            }
        }
        problems.check()?;
        let mut modules = Vec::with_capacity(checked.len());
        for (component, path, module, kind) in checked {
            match module.load(kind, component, path, peft.alpha(component)?, device) {
                Ok(m) => modules.push(m),
                Err((problem, detail)) => problems.add(problem, detail),
            }
        }
        problems.check()?;
        let Some(&format) = formats.keys().next() else {
            bail!("the adapter holds no LoRA modules")
        };
        Ok(Self { format, modules })
    }

    pub fn format(&self) -> LoraFormat {
        self.format
    }

    /// Every adapted module, sorted by component and path.
    pub fn modules(&self) -> &[LoraModule] {
        &self.modules
    }

    /// The largest rank of any module.
    pub fn rank(&self) -> usize {
        self.modules.iter().map(LoraModule::rank).max().unwrap_or(0)
    }

    /// The alpha shared by every module, if the file gives one.
    pub fn alpha(&self) -> Option<f64> {
        let first = self.modules.first()?.alpha?;
        self.modules
            .iter()
            .all(|m| m.alpha == Some(first))
            .then_some(first)
    }

    /// The adapted layer names (last path component, e.g. `to_q`, `to_out.0`), sorted.
    pub fn target_modules(&self) -> Vec<String> {
        let names: BTreeSet<String> = self
            .modules
            .iter()
            .map(|m| layer_name(&m.path).to_string())
            .collect();
        names.into_iter().collect()
    }

    pub fn num_modules(&self) -> usize {
        self.modules.len()
    }

    /// Every stored tensor: factors and DoRA magnitudes.
    fn tensors(&self) -> impl Iterator<Item = &candle_core::Tensor> {
        self.modules
            .iter()
            .flat_map(|m| m.update.tensors().into_iter().chain(m.dora.as_ref().map(|d| &d.magnitude)))
    }

    /// Number of adapter parameters (factors and DoRA magnitudes).
    pub fn num_params(&self) -> usize {
        self.tensors().map(|t| t.elem_count()).sum()
    }

    /// Bytes held by the parameters in memory.
    pub fn size_bytes(&self) -> usize {
        self.tensors()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// The factorisations used, sorted: `lora`, `locon_tucker`, `loha`, `lokr`, and `dora`
    /// when any module is weight-decomposed.
    pub fn algorithms(&self) -> Vec<&'static str> {
        let names: BTreeSet<&'static str> = self
            .modules
            .iter()
            .flat_map(|m| {
                let kind = match m.update {
                    Update::LowRank { .. } => "lora",
                    Update::Tucker { .. } => "locon_tucker",
                    Update::Hadamard(_) => "loha",
                    Update::Kronecker(_) => "lokr",
                };
                [Some(kind), m.dora.as_ref().map(|_| "dora")]
            })
            .flatten()
            .collect();
        names.into_iter().collect()
    }

    /// Adds every module's delta, scaled by `weight`, to `lora`. The factors are shared, not
    /// copied, and the base weights are never touched.
    pub fn add_to(&self, weight: f64, lora: &mut PipelineLora) {
        for m in &self.modules {
            lora.component_mut(m.component).push(
                m.path.clone(),
                LoraDelta {
                    update: m.update.clone(),
                    scale: weight * m.alpha_scale,
                    dora: m.dora.clone(),
                },
            );
        }
    }
}

/// Understands one tensor key of any supported format.
fn parse_key<'k>(key: &'k str, targets: &'k LoraTargets) -> Result<ParsedKey<'k>, KeyError> {
    const KOHYA: [(&str, Component); 4] = [
        ("lora_unet_", Component::Unet),
        ("lora_te_", Component::TextEncoder),
        ("lora_te1_", Component::TextEncoder),
        ("lora_te2_", Component::TextEncoder2),
    ];
    const DOTTED: [(&str, Component); 4] = [
        ("unet.", Component::Unet),
        ("text_encoder.", Component::TextEncoder),
        ("text_encoder_2.", Component::TextEncoder2),
        ("base_model.model.", Component::Unet),
    ];
    let present = |component| match component {
        Component::TextEncoder2 if !targets.has(component) => Err(KeyError::NoTextEncoder2),
        _ => Ok(()),
    };
    for (prefix, component) in KOHYA {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        present(component)?;
        let (name, suffix) = rest.split_once('.').ok_or(KeyError::Unknown)?;
        let role = Role::kohya(suffix).ok_or(KeyError::Unknown)?;
        let path = targets
            .from_underscored(component, name)
            .or_else(|| sgm_path(targets, component, name))
            .ok_or(KeyError::NotInModel)?;
        let base = targets.shape(component, path).ok_or(KeyError::NotInModel)?;
        return Ok(ParsedKey {
            format: Some(LoraFormat::Kohya),
            component,
            path,
            base,
            role,
        });
    }
    for (prefix, component) in DOTTED {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        present(component)?;
        for (suffix, format, role) in DOTTED_SUFFIXES {
            let Some(path) = rest.strip_suffix(suffix) else {
                continue;
            };
            let (path, base) = targets.resolve(component, path).ok_or(KeyError::NotInModel)?;
            return Ok(ParsedKey {
                format,
                component,
                path,
                base,
                role,
            });
        }
    }
    Err(KeyError::Unknown)
}

/// The module path of kohya's sgm-named SDXL UNet module (`input_blocks_4_1_…`).
fn sgm_path<'t>(targets: &'t LoraTargets, component: Component, name: &str) -> Option<&'t str> {
    if component != Component::Unet {
        return None;
    }
    targets.from_underscored(component, &super::sgm::to_diffusers(name, targets.unet_layers_per_block())?)
}

/// The peft `LoraConfig` diffusers stores in the file's metadata, either flat (`lora_alpha`)
/// or per component (`unet.lora_alpha`). Ranks come from the tensors themselves, so `r` and
/// `rank_pattern` need no reading.
#[derive(Default)]
struct PeftConfig(serde_json::Map<String, Value>);

impl PeftConfig {
    fn parse(metadata: &Option<HashMap<String, String>>) -> Result<Self> {
        let Some(json) = metadata.as_ref().and_then(|m| m.get(PEFT_METADATA_KEY)) else {
            return Ok(Self::default());
        };
        match serde_json::from_str(json) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            _ => bail!("metadata {PEFT_METADATA_KEY} is not a JSON object"),
        }
    }

    fn get(&self, component: Component, field: &str) -> Option<&Value> {
        self.0
            .get(&format!("{component}.{field}"))
            .or_else(|| self.0.get(field))
    }

    /// `(lora_alpha, use_rslora)` for `component`, if the metadata gives an alpha.
    fn alpha(&self, component: Component) -> Result<PeftAlpha> {
        let alpha = match self.get(component, "lora_alpha") {
            None | Some(Value::Null) => return Ok(None),
            Some(v) => v
                .as_f64()
                .context(format!("metadata lora_alpha is not a number: {v}"))?,
        };
        if let Some(problem) = values::problem(alpha.abs()) {
            bail!("invalid LoRA adapter: metadata lora_alpha {alpha:e}: {problem}");
        }
        let rslora = self
            .get(component, "use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Some((alpha, rslora)))
    }
}

/// The layer name of a module path: its last component, with the parent's name when that
/// is an index (`to_out.0`).
fn layer_name(path: &str) -> &str {
    let mut parts = path.rsplitn(3, '.');
    let last = parts.next().unwrap_or(path);
    match parts.next() {
        Some(parent) if last.bytes().all(|b| b.is_ascii_digit()) => {
            &path[path.len() - parent.len() - 1 - last.len()..]
        }
        _ => last,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names() {
        assert_eq!(
            layer_name("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
            "to_q"
        );
        assert_eq!(
            layer_name("mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"),
            "to_out.0"
        );
        assert_eq!(layer_name("conv_in"), "conv_in");
    }
}
