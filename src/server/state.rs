//! Shared server state, handed to every handler and to the /align job runner.

use std::sync::Arc;

use super::adapters::AdapterRegistry;
use crate::align::jobs::AlignJobs;
use crate::rewards::registry::RewardModels;
use super::config::ServerConfig;
use super::error::ApiError;
use super::jobs::JobQueue;
use super::model::{ModelSlot, ModelStatus};
use crate::engine::pipeline::StableDiffusion;

/// Cheap to clone: everything inside is shared.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<ServerConfig>,
    /// The id reported for the model.
    pub model_id: Arc<str>,
    /// The model, once loaded (`model.get()`, or `model.wait().await`).
    pub model: ModelSlot,
    /// The adapters folder and cache (`install`, `register`, `resolve`, ...).
    pub adapters: Arc<AdapterRegistry>,
    /// Image jobs and the queue the generation workers pull from.
    pub jobs: Arc<JobQueue>,
    /// /align training jobs (records under `<data_dir>/align_jobs`).
    pub align: Arc<AlignJobs>,
    /// Where model-based rewards find their weights.
    pub reward_models: RewardModels,
    /// Unix seconds at start.
    pub started: u64,
}

impl AppState {
    /// State for `config`, model not loaded yet; reads the persisted /align job records.
    pub fn new(config: ServerConfig) -> anyhow::Result<Self> {
        let model = ModelSlot::new();
        let adapters = Arc::new(AdapterRegistry::new(
            config.adapters_dir.clone(),
            model.clone(),
            config.adapter_cache_mb.saturating_mul(1024 * 1024),
            &config.pinned_adapters,
        ));
        let jobs = Arc::new(JobQueue::new(
            config.queue_capacity,
            config.workers,
            config.job_history,
        ));
        let align = AlignJobs::open(&config.data_dir.join("align_jobs"))?;
        let reward_models = RewardModels::new(config.reward_models.clone());
        Ok(Self {
            model_id: config.model_id().into(),
            config: Arc::new(config),
            model,
            adapters,
            jobs,
            align,
            reward_models,
            started: super::jobs::unix_now(),
        })
    }

    /// The model, or a 503 while it loads.
    pub fn ready_model(&self) -> Result<Arc<StableDiffusion>, ApiError> {
        match self.model.status() {
            ModelStatus::Ready(m) => Ok(m),
            ModelStatus::Loading => Err(ApiError::unavailable(
                "the model is still loading; retry shortly",
                5,
            )),
            ModelStatus::Failed(e) => Err(ApiError::unavailable(
                format!("the model failed to load: {e}"),
                60,
            )
            .code("model_load_failed")),
        }
    }
}
