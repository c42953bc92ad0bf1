//! A LoRA adapter whose factors are trainable candle `Var`s.

use candle_core::{DType, Device, Result, Tensor, Var};

use super::{Component, LoraAdapter, LoraDelta, LoraSet};
use crate::noise::NoiseRng;

/// One adapted linear layer: `down` is `[rank, in]`, `up` is `[out, rank]`.
#[derive(Debug)]
pub struct TrainableModule {
    pub path: String,
    pub down: Var,
    pub up: Var,
}

/// LoRA factors for a set of UNet linear layers, initialised as peft's `"gaussian"` init
/// (down ~ N(0, (1/rank)²), up = 0) so training starts from the base model.
#[derive(Debug)]
pub struct TrainableLora {
    modules: Vec<TrainableModule>,
    rank: usize,
    alpha: f64,
}

impl TrainableLora {
    /// `targets` lists `(module path, in features, out features)`.
    pub fn new(
        targets: &[(String, usize, usize)],
        rank: usize,
        alpha: f64,
        rng: &mut NoiseRng,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let modules = targets
            .iter()
            .map(|(path, in_f, out_f)| {
                let down = (rng.randn((rank, *in_f), dtype, device)? / rank as f64)?;
                Ok(TrainableModule {
                    path: path.clone(),
                    down: Var::from_tensor(&down)?,
                    up: Var::zeros((*out_f, rank), dtype, device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { modules, rank, alpha })
    }

    /// Starts from an existing adapter's UNet linear modules (its `alpha / rank` folded into
    /// `up`), to continue training it.
    pub fn from_adapter(adapter: &LoraAdapter, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let mut modules = Vec::new();
        for m in adapter.modules() {
            let (down, up) = match m.update.low_rank() {
                Some((down, up)) if m.component == Component::Unet && down.rank() == 2 && m.dora.is_none() => (down, up),
                _ => anyhow::bail!("only UNet linear-layer LoRA adapters can be trained further; {} is not one", m.path),
            };
            let up = (up * m.alpha_scale)?;
            modules.push(TrainableModule {
                path: m.path.clone(),
                down: Var::from_tensor(&down.to_dtype(dtype)?.to_device(device)?)?,
                up: Var::from_tensor(&up.to_dtype(dtype)?.to_device(device)?)?,
            });
        }
        let rank = adapter.rank();
        Ok(Self { modules, rank, alpha: rank as f64 })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// `alpha / rank`, the factor applied to `up · down`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    pub fn modules(&self) -> &[TrainableModule] {
        &self.modules
    }

    /// All trainable tensors, `down` then `up` for each module.
    pub fn vars(&self) -> Vec<&Var> {
        self.modules.iter().flat_map(|m| [&m.down, &m.up]).collect()
    }

    pub fn num_params(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// The deltas with gradient tracking, for the steps that carry gradient.
    pub fn lora_set(&self) -> LoraSet {
        self.build_set(|v| v.as_tensor().clone())
    }

    /// The same deltas cut from the graph, for steps run without gradient.
    pub fn detached_set(&self) -> LoraSet {
        self.build_set(|v| v.as_detached_tensor())
    }

    fn build_set(&self, view: impl Fn(&Var) -> Tensor) -> LoraSet {
        let mut set = LoraSet::default();
        for m in &self.modules {
            set.push(m.path.clone(), LoraDelta::low_rank(view(&m.down), view(&m.up), self.scale()));
        }
        set
    }

    /// `(path, down, up · scale)` per module: the factors in the alpha-free diffusers format.
    pub fn export(&self) -> Result<Vec<(String, Tensor, Tensor)>> {
        self.modules
            .iter()
            .map(|m| {
                let up = (m.up.as_detached_tensor() * self.scale())?.to_dtype(DType::F32)?;
                Ok((m.path.clone(), m.down.as_detached_tensor().to_dtype(DType::F32)?, up))
            })
            .collect()
    }
}
