//! The LAION aesthetic predictor (improved-aesthetic-predictor, the AlignProp / DDPO
//! `aesthetic` reward): an MLP 768→1024→128→64→16→1 without activations on unit-norm
//! projected CLIP ViT-L/14 image embeddings.
//!
//! Files in `<reward models>/aesthetic/`:
//! - `config.json` and `model.safetensors` (or `model.fp16.safetensors`): a transformers
//!   `CLIPModel` (e.g. `openai/clip-vit-large-patch14`) or `CLIPVisionModelWithProjection`;
//! - `aesthetic_head.safetensors`: the predictor's linear layers `layers.{0,2,4,6,7}.weight`
//!   and `.bias` (`sac+logos+ava1-l14-linearMSE.pth` converted, see `docs/rewards.md`).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::clip_input::image_features;
use super::models::{candle_error, require, ClipCheckpoint, ModelCache, OnDemand};
use super::Reward;
use crate::model::clip::ClipVisionModel;
use crate::model::weights;

/// Registry name.
pub const NAME: &str = "aesthetic";
/// The head's weight file in the reward's folder.
pub const HEAD_FILE: &str = "aesthetic_head.safetensors";
/// `(nn.Sequential index, output width)` of the head's linear layers; the dropouts between
/// them are the identity at inference.
const HEAD_LAYERS: [(usize, usize); 5] = [(0, 1024), (2, 128), (4, 64), (6, 16), (7, 1)];

/// The predictor MLP.
pub struct AestheticHead {
    layers: Vec<Linear>,
}

impl AestheticHead {
    /// `vb` holds `layers.{i}.weight` / `.bias`; `input` is the CLIP projection width.
    pub fn new(vb: VarBuilder, input: usize) -> Result<Self> {
        let mut width = input;
        let mut layers = Vec::with_capacity(HEAD_LAYERS.len());
        for (index, out) in HEAD_LAYERS {
            layers.push(candle_nn::linear(width, out, vb.pp(format!("layers.{index}")))?);
            width = out;
        }
        Ok(Self { layers })
    }

    /// `[B]` scores for `[B, input]` embeddings.
    pub fn forward(&self, embeds: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = embeds.clone();
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        x.squeeze(1)
    }
}

struct Models {
    clip: ClipVisionModel,
    head: AestheticHead,
}

/// The `aesthetic` reward.
pub struct Aesthetic {
    checkpoint: ClipCheckpoint,
    head: VarBuilder<'static>,
    models: OnDemand<Models>,
}

impl Aesthetic {
    /// Checks the files in `dir` (shapes of the head included); the CLIP weights load on first use.
    pub fn open(dir: &Path, cache: &ModelCache) -> Result<Self> {
        let checkpoint = ClipCheckpoint::open(NAME, dir)?;
        let head_path = require(NAME, dir.join(HEAD_FILE))?;
        let head = weights::open(&head_path, DType::F32, &Device::Cpu)?;
        AestheticHead::new(head.clone(), checkpoint.embed_dim)
            .with_context(|| format!("reward {NAME}: invalid head {}", head_path.display()))?;
        Ok(Self { checkpoint, head, models: OnDemand::new(dir, cache) })
    }

    fn try_score(&self, images: &Tensor) -> Result<Tensor> {
        let models = self.models.get(images, |device, dtype| {
            let head = self.head.clone().set_device(device.clone()).set_dtype(dtype);
            Ok(Models {
                clip: self.checkpoint.vision_model(device, dtype)?,
                head: AestheticHead::new(head, self.checkpoint.embed_dim)?,
            })
        })?;
        let embeds = image_features(&models.clip, self.checkpoint.vision.image_size, images)?;
        Ok(models.head.forward(&embeds)?)
    }
}

impl Reward for Aesthetic {
    fn name(&self) -> &str {
        NAME
    }

    fn score(&self, images: &Tensor, _prompts: &[String]) -> candle_core::Result<Tensor> {
        self.try_score(images).map_err(candle_error)
    }
}
