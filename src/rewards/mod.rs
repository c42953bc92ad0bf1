//! Differentiable rewards: each maps decoded images `[B, 3, H, W]` in `[0, 1]` (and their
//! prompts) to one score per image.

pub mod aesthetic;
pub mod clip_input;
pub mod clip_score;
pub mod compressibility;
pub mod models;
pub mod object_count;
pub mod object_count_train;
pub mod pixel;
pub mod prompt_match;
pub mod registry;

use candle_core::{Result, Tensor};

/// A reward to maximise. `score` must be differentiable w.r.t. `images`.
pub trait Reward: Send + Sync {
    /// Registry name, e.g. `brightness`.
    fn name(&self) -> &str;
    /// `[B]` rewards for `[B, 3, H, W]` images in `[0, 1]`.
    fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor>;
}

/// A weighted sum of rewards.
pub struct WeightedRewards {
    parts: Vec<(Box<dyn Reward>, f64)>,
}

impl WeightedRewards {
    pub fn new(parts: Vec<(Box<dyn Reward>, f64)>) -> Self {
        Self { parts }
    }

    /// `[B]` combined rewards.
    pub fn score(&self, images: &Tensor, prompts: &[String]) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for (reward, weight) in &self.parts {
            let r = (reward.score(images, prompts)? * *weight)?;
            total = Some(match total {
                Some(t) => (t + r)?,
                None => r,
            });
        }
        total.ok_or_else(|| candle_core::Error::Msg("no rewards given".into()))
    }
}
