//! The reward registry: a request names rewards with weights, the registry builds them.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::compressibility::{Compressibility, Incompressibility};
use super::pixel::{Brightness, Saturation, TargetColor};
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
];

/// Builds one reward.
pub fn build(spec: &RewardSpec, _models: &RewardModels) -> Result<Box<dyn Reward>> {
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
        other => {
            let names: Vec<&str> = REWARDS.iter().map(|r| r.name).collect();
            bail!("unknown reward {other:?} (available: {})", names.join(", "))
        }
    })
}

/// Builds the weighted sum of `specs`.
pub fn build_all(specs: &[RewardSpec], models: &RewardModels) -> Result<WeightedRewards> {
    if specs.is_empty() {
        bail!("at least one reward is required");
    }
    let parts = specs.iter().map(|s| Ok((build(s, models)?, s.weight))).collect::<Result<Vec<_>>>()?;
    Ok(WeightedRewards::new(parts))
}
