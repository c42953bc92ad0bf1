//! Weights of the model-based rewards: transformers CLIP checkpoint folders, checked when a
//! reward is built and loaded on first use for the images' device and dtype, through a cache
//! that shares loaded models between the rewards (and jobs) using them at the same time.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, DeviceLocation, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::model::clip::{ClipTextModel, ClipVisionModel};
use crate::model::config::{read_json, ClipTextConfig, ClipVisionConfig};
use crate::model::weights;

/// `path` if it exists, else an error naming it and `reward`.
pub fn require(reward: &str, path: PathBuf) -> Result<PathBuf> {
    if !path.exists() {
        bail!("reward {reward}: missing {} (see docs/rewards.md)", path.display());
    }
    Ok(path)
}

/// A reward error as a candle error (the [`super::Reward`] trait's error type).
pub fn candle_error(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}

/// Locks `m`, also after a panic in another holder.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A transformers CLIP checkpoint folder (`config.json`, `model.safetensors`), checked and
/// memory-mapped; its towers are built on demand for a device and dtype.
pub struct ClipCheckpoint {
    weights: PathBuf,
    vb: VarBuilder<'static>,
    /// The vision tower's config, `projection_dim` taken from `visual_projection.weight`.
    pub vision: ClipVisionConfig,
    /// Width of the projected embeddings.
    pub embed_dim: usize,
    text: Option<ClipTextConfig>,
}

impl ClipCheckpoint {
    /// Opens `dir` for `reward`: a `CLIPModel` or a `CLIPVisionModelWithProjection`, which
    /// must have `visual_projection`.
    pub fn open(reward: &str, dir: &Path) -> Result<Self> {
        let config_path = require(reward, dir.join("config.json"))?;
        let config: Value = read_json(&config_path)?;
        let (vision, text) = parse_config(&config)
            .with_context(|| format!("reward {reward}: invalid {}", config_path.display()))?;
        let weights = weights::find_weights(dir, "model").with_context(|| format!("reward {reward}"))?;
        let vb = weights::open(&weights, DType::F32, &Device::Cpu)?;
        let embed_dim = projection_rows(&vb, &weights, reward, "visual_projection")?;
        let vision = ClipVisionConfig { projection_dim: Some(embed_dim), ..vision };
        Ok(Self { weights, vb, vision, embed_dim, text })
    }

    /// Checks that the checkpoint is a full `CLIPModel`, with a text tower and `text_projection`.
    pub fn require_text(&mut self, reward: &str) -> Result<()> {
        let dim = projection_rows(&self.vb, &self.weights, reward, "text_projection")?;
        let Some(text) = &mut self.text else {
            bail!("reward {reward}: {} has no text_config (a CLIPModel is needed)", self.weights.display());
        };
        if dim != self.embed_dim {
            bail!("reward {reward}: text and image projections differ in width ({dim} vs {})", self.embed_dim);
        }
        text.projection_dim = Some(dim);
        Ok(())
    }

    fn weights_on(&self, device: &Device, dtype: DType) -> VarBuilder<'static> {
        self.vb.clone().set_device(device.clone()).set_dtype(dtype)
    }

    pub fn vision_model(&self, device: &Device, dtype: DType) -> Result<ClipVisionModel> {
        ClipVisionModel::new(self.weights_on(device, dtype), &self.vision)
            .with_context(|| format!("loading the vision tower of {}", self.weights.display()))
    }

    /// The text tower (after [`Self::require_text`]).
    pub fn text_model(&self, device: &Device, dtype: DType) -> Result<ClipTextModel> {
        let cfg = self.text.as_ref().context("the CLIP checkpoint has no text tower")?;
        ClipTextModel::new(self.weights_on(device, dtype), cfg)
            .with_context(|| format!("loading the text tower of {}", self.weights.display()))
    }
}

/// Rows of `<projection>.weight` in `vb` (the file `weights`): the projected width.
fn projection_rows(vb: &VarBuilder, weights: &Path, reward: &str, projection: &str) -> Result<usize> {
    let key = format!("{projection}.weight");
    if !vb.contains_tensor(&key) {
        bail!("reward {reward}: {} has no {key}", weights.display());
    }
    Ok(vb.get_unchecked(&key)?.dim(0)?)
}

/// The vision and (for a `CLIPModel`) text configs of a `config.json`, with transformers'
/// `CLIPVisionConfig` / `CLIPTextConfig` defaults for the fields it leaves out.
fn parse_config(config: &Value) -> Result<(ClipVisionConfig, Option<ClipTextConfig>)> {
    let vision_defaults = json!({
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
    });
    let text_defaults = json!({
        "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
        "num_hidden_layers": 12, "num_attention_heads": 8,
    });
    let Some(vision) = config.get("vision_config") else {
        return Ok((with_defaults(vision_defaults, config)?, None));
    };
    let text = config.get("text_config").filter(|t| !t.is_null());
    let text = text.map(|t| with_defaults(text_defaults, t).context("text_config")).transpose()?;
    Ok((with_defaults(vision_defaults, vision).context("vision_config")?, text))
}

/// `given` (a JSON object) over `defaults`, parsed.
fn with_defaults<T: DeserializeOwned>(mut defaults: Value, given: &Value) -> Result<T> {
    let given = given.as_object().context("expected a JSON object")?;
    defaults.as_object_mut().expect("defaults are an object").extend(given.clone());
    Ok(serde_json::from_value(defaults)?)
}

type CacheKey = (PathBuf, TypeId, DeviceLocation, DType);
/// A loaded model and its device (one location may hold several `Device`s).
type CacheEntry = (Device, Weak<dyn Any + Send + Sync>);

/// Loaded reward models, shared while some reward holds them: one per folder, model type,
/// device and dtype. Clones share the cache.
#[derive(Clone, Default)]
pub struct ModelCache(Arc<Mutex<HashMap<CacheKey, CacheEntry>>>);

impl fmt::Debug for ModelCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelCache({} entries)", lock(&self.0).len())
    }
}

impl ModelCache {
    /// The `T` of `dir` on `device` in `dtype`: the one some reward holds, else `load()`.
    fn get_or_load<T: Send + Sync + 'static>(
        &self,
        dir: &Path,
        device: &Device,
        dtype: DType,
        load: impl FnOnce() -> Result<T>,
    ) -> Result<Arc<T>> {
        let key = (dir.to_path_buf(), TypeId::of::<T>(), device.location(), dtype);
        let mut entries = lock(&self.0);
        entries.retain(|_, (_, model)| model.strong_count() > 0);
        if let Some((dev, model)) = entries.get(&key) {
            let shared = model.upgrade().and_then(|m| m.downcast::<T>().ok());
            if let Some(model) = shared.filter(|_| dev.same_device(device)) {
                return Ok(model);
            }
        }
        let model = Arc::new(load()?);
        let weak: Weak<dyn Any + Send + Sync> = Arc::<T>::downgrade(&model);
        entries.insert(key, (device.clone(), weak));
        Ok(model)
    }
}

/// A reward's models: loaded through the cache on first use for the images' device and
/// dtype, then held (so shared through the cache) while the reward lives.
pub struct OnDemand<T> {
    dir: PathBuf,
    cache: ModelCache,
    held: Mutex<Option<(Device, DType, Arc<T>)>>,
}

impl<T: Send + Sync + 'static> OnDemand<T> {
    pub fn new(dir: &Path, cache: &ModelCache) -> Self {
        Self { dir: dir.to_path_buf(), cache: cache.clone(), held: Mutex::new(None) }
    }

    /// The models for `images`' device and dtype, `load`ed if nobody holds them.
    pub fn get(&self, images: &Tensor, load: impl FnOnce(&Device, DType) -> Result<T>) -> Result<Arc<T>> {
        let (device, dtype) = (images.device(), images.dtype());
        let mut held = lock(&self.held);
        if let Some((d, t, models)) = held.as_ref() {
            if d.same_device(device) && *t == dtype {
                return Ok(models.clone());
            }
        }
        let models = self.cache.get_or_load(&self.dir, device, dtype, || load(device, dtype))?;
        *held = Some((device.clone(), dtype, models.clone()));
        Ok(models)
    }
}
