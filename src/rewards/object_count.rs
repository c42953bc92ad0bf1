//! Object count: a small CNN predicts a distribution over how many shapes an image holds
//! (0..=`max_count`); the reward is minus a smooth distance between its expectation and the
//! total count the prompt names.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use super::Reward;
use crate::dataset::{parse_caption, total_count};

/// Architecture of [`ObjectCounter`] (`config.json` next to the weights).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjectCountConfig {
    /// Side of the square input; larger images whose side is a multiple of it are
    /// average-pooled down to it.
    pub image_size: usize,
    /// Output channels of each 3×3 convolution, each followed by SiLU and 2×2 average pooling.
    pub channels: Vec<usize>,
    /// Width of the hidden fully connected layer.
    pub hidden: usize,
    /// Largest count the head predicts.
    pub max_count: usize,
    /// Softmax temperature of the reward's expected count (accuracy is measured at 1). A
    /// counter whose logits are far apart saturates the softmax and leaves the reward almost
    /// no gradient; `train-counter`'s label smoothing keeps them a few units apart, and ~2
    /// (the committed counter's setting) lets confidently wrong counts pass more of it.
    #[serde(default = "one")]
    pub reward_temperature: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for ObjectCountConfig {
    fn default() -> Self {
        Self { image_size: 64, channels: vec![16, 32, 32, 32], hidden: 64, max_count: 6, reward_temperature: 1.0 }
    }
}

/// The counting CNN: conv stages, then two linear layers giving logits over 0..=`max_count`.
pub struct ObjectCounter {
    cfg: ObjectCountConfig,
    convs: Vec<Conv2d>,
    fc1: Linear,
    fc2: Linear,
    dtype: DType,
    device: Device,
}

impl ObjectCounter {
    pub fn new(vb: VarBuilder, cfg: &ObjectCountConfig) -> Result<Self> {
        let conv_cfg = Conv2dConfig { padding: 1, ..Default::default() };
        let mut convs = Vec::with_capacity(cfg.channels.len());
        let mut c_in = 3;
        for (i, &c) in cfg.channels.iter().enumerate() {
            convs.push(candle_nn::conv2d(c_in, c, 3, conv_cfg, vb.pp(format!("convs.{i}")))?);
            c_in = c;
        }
        let side = cfg.image_size >> cfg.channels.len();
        if side == 0 || side << cfg.channels.len() != cfg.image_size {
            candle_core::bail!("object_count: image_size {} is not divisible by 2^{}", cfg.image_size, cfg.channels.len());
        }
        let fc1 = candle_nn::linear(c_in * side * side, cfg.hidden, vb.pp("fc1"))?;
        let fc2 = candle_nn::linear(cfg.hidden, cfg.max_count + 1, vb.pp("fc2"))?;
        Ok(Self { cfg: cfg.clone(), convs, fc1, fc2, dtype: vb.dtype(), device: vb.device().clone() })
    }

    pub fn config(&self) -> &ObjectCountConfig {
        &self.cfg
    }

    /// `[B, max_count + 1]` logits for `[B, 3, H, H]` images in `[0, 1]`, `H` a multiple of
    /// `image_size`.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = images.dims4()?;
        let s = self.cfg.image_size;
        if c != 3 || h != w || h % s != 0 {
            candle_core::bail!("object_count expects [B, 3, H, H] images with H a multiple of {s}, got {:?}", images.dims());
        }
        let mut x = if h == s { images.clone() } else { images.avg_pool2d(h / s)? };
        x = x.affine(2.0, -1.0)?;
        for conv in &self.convs {
            x = conv.forward(&x)?.silu()?.avg_pool2d(2)?;
        }
        self.fc2.forward(&self.fc1.forward(&x.flatten_from(1)?)?.silu()?)
    }

    /// `[B]` expected count under the predicted distribution at softmax `temperature`.
    pub fn expected_count(&self, images: &Tensor, temperature: f64) -> Result<Tensor> {
        self.expected_from_logits(&self.forward(images)?, temperature)
    }

    /// [`Self::expected_count`] from logits already computed by [`Self::forward`].
    pub fn expected_from_logits(&self, logits: &Tensor, temperature: f64) -> Result<Tensor> {
        let probs = candle_nn::ops::softmax(&(logits / temperature)?, 1)?;
        let counts = Tensor::arange(0u32, self.cfg.max_count as u32 + 1, probs.device())?.to_dtype(probs.dtype())?;
        probs.broadcast_mul(&counts.unsqueeze(0)?)?.sum(1)
    }
}

/// Width of the pseudo-Huber bend of the reward around an exact count.
const SMOOTHING: f64 = 0.1;

/// The total count the prompt names ("two red circles and one blue square" → 3).
pub fn prompt_count(prompt: &str) -> Result<usize> {
    match parse_caption(prompt) {
        Some(groups) => Ok(total_count(&groups)),
        None => candle_core::bail!(
            "object_count: cannot read a count from prompt {prompt:?} (expected e.g. \"two red circles and one blue square\")"
        ),
    }
}

/// Rewards images whose predicted object count matches the prompt. An image the counter
/// already counts right (its expected count at temperature 1 rounds to the named count) scores
/// 0 and adds no gradient; a miscounted one scores minus the pseudo-Huber distance
/// `sqrt(d² + δ²) − δ` (δ = 0.1) between the expected count at the reward temperature and the
/// named count, ≈ −|d|. Without that dead zone the correctly counted half of a batch, nudged
/// toward the middle of the count range by the temperature, would add to every step
/// directions that change nothing an evaluator would see.
pub struct ObjectCount {
    counter: ObjectCounter,
}

impl ObjectCount {
    /// The folder name under the reward models folder.
    pub const DIR: &'static str = "object_count";

    pub fn new(counter: ObjectCounter) -> Self {
        Self { counter }
    }

    /// Loads `<dir>/config.json` and `<dir>/model.safetensors` (f32) onto `device`.
    pub fn load(dir: &Path, device: &Device) -> anyhow::Result<Self> {
        let cfg: ObjectCountConfig = crate::model::config::read_json(&dir.join("config.json"))?;
        let vb = crate::model::weights::open(&dir.join("model.safetensors"), DType::F32, device)?;
        let counter = ObjectCounter::new(vb, &cfg).with_context(|| format!("invalid object_count weights in {}", dir.display()))?;
        Ok(Self::new(counter))
    }

    pub fn counter(&self) -> &ObjectCounter {
        &self.counter
    }
}

impl Reward for ObjectCount {
    fn name(&self) -> &str {
        "object_count"
    }

    /// Images are moved to the counter's device and dtype (differentiably) and the rewards
    /// moved back.
    fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor> {
        let b = images.dim(0)?;
        if prompts.len() != b {
            candle_core::bail!("object_count: {} prompts for {b} images", prompts.len());
        }
        let counts = prompts.iter().map(|p| prompt_count(p).map(|n| n as f64)).collect::<Result<Vec<_>>>()?;
        let counter = &self.counter;
        let x = images.to_device(&counter.device)?.to_dtype(counter.dtype)?;
        let target = Tensor::new(counts, &counter.device)?.to_dtype(counter.dtype)?;
        let logits = counter.forward(&x)?;
        let d2 = (counter.expected_from_logits(&logits, counter.cfg.reward_temperature)? - &target)?.sqr()?;
        let distance = ((d2 + SMOOTHING * SMOOTHING)?.sqrt()? - SMOOTHING)?;
        let counted = counter.expected_from_logits(&logits.detach(), 1.0)?;
        let miscounted = (counted - &target)?.abs()?.ge(0.5)?.to_dtype(distance.dtype())?;
        (distance * miscounted)?.neg()?.to_device(images.device())?.to_dtype(images.dtype())
    }
}
