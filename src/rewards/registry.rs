//! The reward registry: a request names rewards with weights, the registry builds them.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::aesthetic::Aesthetic;
use super::clip_score::ClipScore;
use super::compressibility::{Compressibility, Incompressibility};
use super::models::ModelCache;
use super::object_count::ObjectCount;
use super::pixel::{Brightness, Saturation, TargetColor};
use super::prompt_match::PromptMatch;
use super::{Reward, WeightedRewards};

/// One weighted reward of a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RewardSpec {
    /// A registered reward name (see `GET /v1/align/rewards`).
    #[schema(example = "brightness")]
    pub reward: String,
    /// Weight in the summed objective (negative to minimise).
    #[serde(default = "one")]
    pub weight: f64,
    /// RGB target in [0, 1] for `target_color`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<[f64; 3]>,
}

fn one() -> f64 {
    1.0
}

/// Where model-based rewards find their weights.
#[derive(Clone, Debug, Default)]
pub struct RewardModels {
    /// Folder with one sub-folder per model-based reward (e.g. `aesthetic/`).
    pub dir: Option<PathBuf>,
    /// Models loaded by the rewards built from this value and its clones, shared while in use.
    pub cache: ModelCache,
}

impl RewardModels {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: Some(dir.into()), ..Self::default() }
    }

    /// `<dir>/<sub>`, the weights folder of `reward`.
    fn folder(&self, reward: &str, sub: &str) -> Result<PathBuf> {
        match &self.dir {
            Some(dir) => Ok(dir.join(sub)),
            None => bail!("reward {reward} needs a reward models folder holding {sub}/ (see docs/rewards.md)"),
        }
    }
}

/// A reward the registry can build, with a one-line description.
pub struct RewardInfo {
    pub name: &'static str,
    pub description: &'static str,
}

/// Every registered reward.
pub const REWARDS: &[RewardInfo] = &[
    RewardInfo { name: "brightness", description: "mean pixel value" },
    RewardInfo { name: "saturation", description: "mean per-pixel RGB spread" },
    RewardInfo { name: "target_color", description: "minus the mean squared distance to `color`" },
    RewardInfo { name: "compressibility", description: "minus the estimated JPEG bits per pixel (8x8 DCT vs the quantisation table)" },
    RewardInfo { name: "incompressibility", description: "the estimated JPEG bits per pixel" },
    RewardInfo { name: "object_count", description: "0 when a CNN counts as many objects as the prompt names, else minus the smoothed distance between its expected count and the named one" },
    RewardInfo { name: "prompt_match", description: "foreground share in the prompt's colours minus the share in other palette colours" },
    RewardInfo { name: "aesthetic", description: "LAION aesthetic predictor on CLIP ViT-L/14 image embeddings (weights in aesthetic/)" },
    RewardInfo { name: "clip_score", description: "cosine similarity of the CLIP image and prompt embeddings (weights in clip/)" },
    RewardInfo { name: "hps", description: "HPSv2 human preference score: the CLIP cosine with HPSv2 weights (weights in hps/)" },
];

/// Builds one reward.
pub fn build(spec: &RewardSpec, models: &RewardModels) -> Result<Box<dyn Reward>> {
    if !spec.weight.is_finite() {
        bail!("reward {:?}: weight must be finite", spec.reward);
    }
    Ok(match spec.reward.as_str() {
        "brightness" => Box::new(Brightness),
        "saturation" => Box::new(Saturation),
        "target_color" => match spec.color {
            Some(c) if c.iter().all(|v| (0.0..=1.0).contains(v)) => Box::new(TargetColor::new(c)),
            _ => bail!("reward target_color needs `color`: three numbers in [0, 1]"),
        },
        "compressibility" => Box::new(Compressibility),
        "incompressibility" => Box::new(Incompressibility),
        "object_count" => Box::new(object_count(models)?),
        "prompt_match" => Box::new(PromptMatch),
        "aesthetic" => Box::new(Aesthetic::open(&models.folder("aesthetic", "aesthetic")?, &models.cache)?),
        "clip_score" => Box::new(ClipScore::open("clip_score", &models.folder("clip_score", "clip")?, &models.cache)?),
        "hps" => Box::new(ClipScore::open("hps", &models.folder("hps", "hps")?, &models.cache)?),
        other => {
            let names: Vec<&str> = REWARDS.iter().map(|r| r.name).collect();
            bail!("unknown reward {other:?} (available: {})", names.join(", "))
        }
    })
}

/// The object-count reward from `<models.dir>/object_count` (on the CPU).
fn object_count(models: &RewardModels) -> Result<ObjectCount> {
    let dir = models.folder("object_count", ObjectCount::DIR)?;
    if !dir.join("model.safetensors").is_file() {
        bail!("reward object_count: no weights at {} (train them with `sdserve train-counter --out {}`)", dir.join("model.safetensors").display(), dir.display());
    }
    ObjectCount::load(&dir, &candle_core::Device::Cpu)
}

/// Builds the weighted sum of `specs`.
pub fn build_all(specs: &[RewardSpec], models: &RewardModels) -> Result<WeightedRewards> {
    if specs.is_empty() {
        bail!("at least one reward is required");
    }
    let parts = specs.iter().map(|s| Ok((build(s, models)?, s.weight))).collect::<Result<Vec<_>>>()?;
    Ok(WeightedRewards::new(parts))
}
