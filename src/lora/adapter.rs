//! LoRA adapter files (diffusers, peft and kohya key formats), parsed and validated against
//! the base model.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::targets::{Component, LoraTargets};
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
    /// `input_blocks_…` naming sd-scripts writes).
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

/// One adapted module: the update of its weight is `alpha_scale · up · down`.
#[derive(Clone, Debug)]
pub struct LoraModule {
    pub component: Component,
    pub path: String,
    /// `[rank, in]` or `[rank, in, kh, kw]`, f32.
    pub down: Tensor,
    /// `[out, rank]` or `[out, rank, 1, 1]`, f32.
    pub up: Tensor,
    /// The alpha the file gives for this module, if any.
    pub alpha: Option<f64>,
    /// `alpha / rank` (1 without an alpha).
    pub alpha_scale: f64,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }
}

/// A parsed adapter whose every module was checked against the base model.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    format: LoraFormat,
    modules: Vec<LoraModule>,
}

/// What a tensor key holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Down,
    Up,
    Alpha,
}

/// A tensor key understood as `(format, component, module path, role)`. The format is
/// `None` for an `.alpha` key in dotted form, which any dotted format may carry.
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

/// The tensors found for one module.
struct Parts<'a> {
    base: &'a [usize],
    down: Option<(&'a str, TensorView<'a>)>,
    up: Option<(&'a str, TensorView<'a>)>,
    alpha: Option<(&'a str, TensorView<'a>)>,
}

/// Offending keys grouped by problem, reported together in one error.
#[derive(Default)]
struct Problems(BTreeMap<&'static str, Vec<String>>);

impl Problems {
    fn add(&mut self, problem: &'static str, key: impl Into<String>) {
        self.0.entry(problem).or_default().push(key.into());
    }

    fn check(self) -> Result<()> {
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
        let mut parts = BTreeMap::<(Component, &str), Parts>::new();
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
            let entry = parts
                .entry((key.component, key.path))
                .or_insert_with(|| Parts {
                    base: key.base,
                    down: None,
                    up: None,
                    alpha: None,
                });
            let slot = match key.role {
                Role::Down => &mut entry.down,
                Role::Up => &mut entry.up,
                Role::Alpha => &mut entry.alpha,
            };
            if let Some((first, _)) = slot.replace((name, view)) {
                problems.add(
                    "keys given twice for one module",
                    format!("{first} and {name}"),
                );
            }
        }
        if formats.len() > 1 {
            for (format, key) in &formats {
                problems.add(
                    "keys of different formats mixed",
                    format!("{key} ({format})"),
                );
            }
        }

        let mut modules = Vec::with_capacity(parts.len());
        for ((component, path), p) in parts {
            let (down, up) = match (p.down, p.up) {
                (Some(down), Some(up)) => (down, up),
                (Some((key, _)), None) => {
                    problems.add("missing up weight", key);
                    continue;
                }
                (None, Some((key, _))) => {
                    problems.add("missing down weight", key);
                    continue;
                }
                (None, None) => {
                    problems.add(
                        "alpha without weights",
                        p.alpha.map_or(path, |(key, _)| key),
                    );
                    continue;
                }
            };
            for (key, view) in [Some(&down), Some(&up), p.alpha.as_ref()]
                .into_iter()
                .flatten()
            {
                if float_dtype(view.dtype()).is_none() {
                    problems.add(
                        "unsupported dtypes (need a float type)",
                        format!("{key} {:?}", view.dtype()),
                    );
                }
            }
            let base = p.base;
            if !fits(base, down.1.shape(), up.1.shape()) {
                problems.add(
                    "shapes that do not fit the base weight",
                    format!(
                        "{} {:?} / {} {:?} (base weight {base:?})",
                        down.0,
                        down.1.shape(),
                        up.0,
                        up.1.shape()
                    ),
                );
                continue;
            }
            if let Some((key, view)) = &p.alpha {
                if view.shape().iter().product::<usize>() != 1 {
                    problems.add("alpha is not a scalar", *key);
                }
            }
            if problems.0.is_empty() {
                let alpha = p.alpha.as_ref().map(|(_, view)| view);
                modules.push(load_module(
                    component,
                    path,
                    base,
                    [&down.1, &up.1],
                    alpha,
                    &peft,
                    device,
                )?);
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

    /// Number of LoRA parameters (down and up factors).
    pub fn num_params(&self) -> usize {
        self.modules
            .iter()
            .map(|m| m.down.elem_count() + m.up.elem_count())
            .sum()
    }

    /// Bytes held by the factors in memory.
    pub fn size_bytes(&self) -> usize {
        self.modules
            .iter()
            .map(|m| {
                m.down.elem_count() * m.down.dtype().size_in_bytes()
                    + m.up.elem_count() * m.up.dtype().size_in_bytes()
            })
            .sum()
    }

    /// Adds every module's delta, scaled by `weight`, to `lora`. The factors are shared, not
    /// copied, and the base weights are never touched.
    pub fn add_to(&self, weight: f64, lora: &mut PipelineLora) {
        for m in &self.modules {
            lora.component_mut(m.component).push(
                m.path.clone(),
                LoraDelta {
                    down: m.down.clone(),
                    up: m.up.clone(),
                    scale: weight * m.alpha_scale,
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
    const SUFFIXES: [(&str, Option<LoraFormat>, Role); 7] = [
        (".lora.down.weight", Some(LoraFormat::Diffusers), Role::Down),
        (".lora.up.weight", Some(LoraFormat::Diffusers), Role::Up),
        (
            ".lora_linear_layer.down.weight",
            Some(LoraFormat::Diffusers),
            Role::Down,
        ),
        (
            ".lora_linear_layer.up.weight",
            Some(LoraFormat::Diffusers),
            Role::Up,
        ),
        (".lora_A.weight", Some(LoraFormat::Peft), Role::Down),
        (".lora_B.weight", Some(LoraFormat::Peft), Role::Up),
        (".alpha", None, Role::Alpha),
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
        let role = match suffix {
            "lora_down.weight" => Role::Down,
            "lora_up.weight" => Role::Up,
            "alpha" => Role::Alpha,
            _ => return Err(KeyError::Unknown),
        };
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
        for (suffix, format, role) in SUFFIXES {
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
    let diffusers = super::sgm::to_diffusers(name, targets.unet_layers_per_block())?;
    (component == Component::Unet).then(|| targets.from_underscored(component, &diffusers)).flatten()
}

/// Whether `down` / `up` fit a base weight of shape `base` (`[out, in]` or `[out, in, kh, kw]`):
/// down `[r, in]` / `[r, in, kh, kw]` and up `[out, r]` / `[out, r, 1, 1]`, with r > 0. A 1×1
/// kernel may be given or left out on either side.
fn fits(base: &[usize], down: &[usize], up: &[usize]) -> bool {
    let (out, input, kernel) = (base[0], base[1], &base[2..]);
    let Some(&r) = down.first() else { return false };
    let pointwise = kernel.iter().all(|&k| k == 1);
    let down_ok = match &down[1..] {
        [i] => *i == input && pointwise,
        [i, 1, 1] if pointwise => *i == input,
        [i, kh, kw] => *i == input && kernel == [*kh, *kw],
        _ => false,
    };
    let up_ok = matches!(up, [o, ur] | [o, ur, 1, 1] if *o == out && *ur == r);
    r > 0 && down_ok && up_ok
}

/// Loads one module's factors as f32, flattening 1×1 kernels of linear layers, and works out
/// its scale.
fn load_module(
    component: Component,
    path: &str,
    base: &[usize],
    [down, up]: [&TensorView; 2],
    alpha: Option<&TensorView>,
    peft: &PeftConfig,
    device: &Device,
) -> Result<LoraModule> {
    let load = |view: &TensorView| -> Result<Tensor> {
        let t = to_f32(view)?;
        let t = if base.len() == 2 && t.rank() == 4 {
            t.flatten_from(1)?
        } else {
            t
        };
        Ok(t.to_device(device)?)
    };
    let (down, up) = (load(down)?, load(up)?);
    let rank = down.dims()[0] as f64;
    let (alpha, alpha_scale) = match alpha {
        Some(view) => {
            let a = to_f32(view)?.flatten_all()?.to_vec1::<f32>()?[0] as f64;
            (Some(a), a / rank)
        }
        None => match peft.alpha(component)? {
            Some(a) if peft.rslora(component) => (Some(a), a / rank.sqrt()),
            Some(a) => (Some(a), a / rank),
            None => (None, 1.0),
        },
    };
    if !alpha_scale.is_finite() {
        bail!("alpha of {component} module {path} is not finite");
    }
    Ok(LoraModule {
        component,
        path: path.to_string(),
        down,
        up,
        alpha,
        alpha_scale,
    })
}

/// The candle dtype of a floating-point safetensors dtype.
fn float_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F32 => Some(DType::F32),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

/// Loads a floating-point tensor on the CPU as f32.
fn to_f32(view: &TensorView) -> Result<Tensor> {
    let dtype = float_dtype(view.dtype()).context("not a floating-point tensor")?;
    Ok(
        Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?
            .to_dtype(DType::F32)?,
    )
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

    fn alpha(&self, component: Component) -> Result<Option<f64>> {
        match self.get(component, "lora_alpha") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .context(format!("metadata lora_alpha is not a number: {v}")),
        }
    }

    fn rslora(&self, component: Component) -> bool {
        self.get(component, "use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false)
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

    #[test]
    fn shape_fit() {
        assert!(fits(&[32, 16], &[4, 16], &[32, 4]));
        assert!(fits(&[32, 16], &[4, 16, 1, 1], &[32, 4, 1, 1]));
        assert!(fits(&[32, 16, 1, 1], &[4, 16], &[32, 4]));
        assert!(fits(&[32, 16, 3, 3], &[4, 16, 3, 3], &[32, 4, 1, 1]));
        assert!(!fits(&[32, 16, 3, 3], &[4, 16], &[32, 4]));
        assert!(!fits(&[32, 16], &[4, 17], &[32, 4]));
        assert!(!fits(&[32, 16], &[4, 16], &[32, 3]));
        assert!(!fits(&[32, 16], &[0, 16], &[32, 0]));
        assert!(!fits(&[32, 16], &[], &[32, 4]));
    }
}
