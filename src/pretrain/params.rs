//! Trainable parameters for models built by name: a `VarBuilder` backend that creates each
//! tensor the first time a model asks for it (PyTorch's default initialisation), keeps it as
//! a `Var`, and saves everything under the requested names — which are the diffusers keys.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::noise::NoiseRng;

struct Store {
    vars: BTreeMap<String, Var>,
    rng: NoiseRng,
}

/// A named set of trainable tensors.
#[derive(Clone)]
pub struct Params(Arc<Mutex<Store>>);

impl Params {
    pub fn new(seed: u64) -> Self {
        Params(Arc::new(Mutex::new(Store { vars: BTreeMap::new(), rng: NoiseRng::new(seed) })))
    }

    /// A builder whose tensors are this set's variables (created on first use).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    pub fn vars(&self) -> Vec<Var> {
        self.lock().vars.values().cloned().collect()
    }

    pub fn num_params(&self) -> usize {
        self.lock().vars.values().map(|v| v.elem_count()).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes every tensor (f32) under its name.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .lock()
            .vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&tensors.into_iter().collect(), &tmp)?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Overwrites the variables with the tensors stored in `path` (for resuming).
    pub fn load(&self, path: &Path) -> Result<()> {
        let stored = candle_core::safetensors::load(path, &Device::Cpu)?;
        for (name, var) in &self.lock().vars {
            let t = stored.get(name).with_context(|| format!("{} lacks {name}", path.display()))?;
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }
}

/// PyTorch's defaults: U(±1/√fan_in) for linear/conv weights and biases, ones/zeros for
/// norms, N(0, 0.02) for embeddings.
fn initial(name: &str, shape: &Shape, rng: &mut NoiseRng, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    let dims = shape.dims();
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let is_norm = name.contains("norm") || name.contains("layrnorm");
    if name.contains("embedding") {
        return rng.randn(shape, dtype, dev)? * 0.02;
    }
    match (leaf, dims.len()) {
        ("weight", 1) if is_norm => Tensor::ones(shape, dtype, dev),
        ("bias", _) if is_norm => Tensor::zeros(shape, dtype, dev),
        _ => {
            let fan_in: usize = if dims.len() >= 2 { dims[1..].iter().product() } else { dims[0] };
            let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
            let n = rng.uniform(shape, dtype, dev)?;
            n.affine(2.0 * bound, -bound)
        }
    }
}

impl SimpleBackend for Params {
    fn get(&self, s: Shape, name: &str, _h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut store = self.lock();
        if let Some(v) = store.vars.get(name) {
            if v.shape() != &s {
                candle_core::bail!("parameter {name} requested with shape {s:?}, exists with {:?}", v.shape());
            }
            return Ok(v.as_tensor().clone());
        }
        let t = initial(name, &s, &mut store.rng, dtype, dev)?;
        let v = Var::from_tensor(&t)?;
        let out = v.as_tensor().clone();
        store.vars.insert(name.to_string(), v);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        match self.lock().vars.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("parameter {name} does not exist yet"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // New models use the current diffusers names (e.g. `to_q`, not the legacy `query`) and
        // no optional extras (SD's `CLIPTextModel` has no `text_projection`).
        !["query.weight", "key.weight", "value.weight", "proj_attn.weight", "text_projection.weight"]
            .iter()
            .any(|l| name.ends_with(l))
    }
}
