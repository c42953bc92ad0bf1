//! `clip_score` and `hps`: the cosine similarity between each image's projected CLIP
//! embedding and its prompt's. `hps` is the same computation with the HPSv2 weights (an
//! open_clip ViT-H/14 fine-tuned on human preferences; its score is this cosine, as in
//! AlignProp), `clip_score` with a plain CLIP.
//!
//! Files in `<reward models>/clip/` (`clip_score`) or `<reward models>/hps/` (`hps`), as
//! `huggingface-cli download` lays out a transformers CLIP repository:
//! - `config.json` and `model.safetensors` (or `model.fp16.safetensors`): a `CLIPModel`;
//! - `vocab.json`, `merges.txt` and optionally `tokenizer_config.json` /
//!   `special_tokens_map.json`: its tokenizer, in the same folder.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};

use super::clip_input::{image_features, l2_normalize};
use super::models::{candle_error, lock, ClipCheckpoint, ModelCache, OnDemand};
use super::Reward;
use crate::lora::LoraSet;
use crate::model::clip::{ClipTextModel, ClipVisionModel};
use crate::model::tokenizer::ClipTokenizer;

struct Models {
    vision: ClipVisionModel,
    text: ClipTextModel,
    /// Unit-norm `[projection_dim]` text embeddings by prompt (no gradient).
    prompts: Mutex<HashMap<String, Tensor>>,
}

impl Models {
    /// `[B, projection_dim]` unit-norm text embeddings of `prompts`, each computed once.
    fn text_features(&self, tokenizer: &ClipTokenizer, prompts: &[String]) -> Result<Tensor> {
        let mut cache = lock(&self.prompts);
        let mut rows = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            if !cache.contains_key(prompt) {
                let ids = Tensor::new(tokenizer.encode(prompt)?.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
                let embeds = l2_normalize(&self.text.text_embeds(&ids, LoraSet::none())?)?;
                cache.insert(prompt.clone(), embeds.squeeze(0)?.detach());
            }
            rows.push(cache[prompt].clone());
        }
        Ok(Tensor::stack(&rows, 0)?)
    }
}

/// The `clip_score` / `hps` reward.
pub struct ClipScore {
    name: &'static str,
    checkpoint: ClipCheckpoint,
    tokenizer: ClipTokenizer,
    models: OnDemand<Models>,
}

impl ClipScore {
    /// Checks the files in `dir` and reads the tokenizer for the reward `name`; the CLIP
    /// weights load on first use.
    pub fn open(name: &'static str, dir: &Path, cache: &ModelCache) -> Result<Self> {
        let mut checkpoint = ClipCheckpoint::open(name, dir)?;
        checkpoint.require_text(name)?;
        let tokenizer = ClipTokenizer::from_dir(dir).with_context(|| format!("reward {name}"))?;
        Ok(Self { name, checkpoint, tokenizer, models: OnDemand::new(dir, cache) })
    }

    fn try_score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor> {
        let batch = images.dim(0)?;
        ensure!(prompts.len() == batch, "reward {}: {} prompts for {batch} images", self.name, prompts.len());
        let models = self.models.get(images, |device, dtype| {
            Ok(Models {
                vision: self.checkpoint.vision_model(device, dtype)?,
                text: self.checkpoint.text_model(device, dtype)?,
                prompts: Mutex::new(HashMap::new()),
            })
        })?;
        let image = image_features(&models.vision, self.checkpoint.vision.image_size, images)?;
        let text = models.text_features(&self.tokenizer, prompts)?;
        Ok((image * text)?.sum(1)?)
    }
}

impl Reward for ClipScore {
    fn name(&self) -> &str {
        self.name
    }

    fn score(&self, images: &Tensor, prompts: &[String]) -> candle_core::Result<Tensor> {
        self.try_score(images, prompts).map_err(candle_error)
    }
}
