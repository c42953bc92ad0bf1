//! Shared server state, handed to every handler and to the /align trainers.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::adapters::AdapterRegistry;
use super::config::ServerConfig;
use super::error::ApiError;
use super::jobs::JobQueue;
use super::model::{ModelSlot, ModelStatus};
use crate::engine::pipeline::StableDiffusion;
use crate::rewards::registry::RewardModels;
use crate::stores::{cache_dir, BlobStore, Stores};

/// Cheap to clone: everything inside is shared.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<ServerConfig>,
    /// The id reported for the model.
    pub model_id: Arc<str>,
    /// This process in the shared `instances` table (owner of its jobs).
    pub instance_id: Arc<str>,
    /// The model, once loaded (`model.get()`, or `model.wait().await`).
    pub model: ModelSlot,
    /// The database: job records, the /align queue, the adapter registry.
    pub stores: Stores,
    /// The adapters this replica serves (`resolve`, `install`, `delete`, ...).
    pub adapters: Arc<AdapterRegistry>,
    /// Image jobs and the queue the generation workers pull from.
    pub jobs: Arc<JobQueue>,
    /// Where model-based rewards find their weights.
    pub reward_models: RewardModels,
    /// Unix seconds at start.
    pub started: u64,
    /// Set when the server stops: trainers take no new job.
    pub stopping: Arc<AtomicBool>,
}

impl AppState {
    /// State for `config`, model not loaded yet: connects to the stores and reads the registry.
    pub async fn new(config: ServerConfig) -> anyhow::Result<Self> {
        let model = ModelSlot::new();
        let stores = Stores::open(&config.stores, &config.data_dir).await?;
        let blobs = Arc::new(BlobStore::open(config.stores.adapter_store.as_deref(), &config.adapters_dir, &cache_dir(&config.data_dir))?);
        tracing::info!("adapter store: {}", blobs.describe());
        let adapters = Arc::new(
            AdapterRegistry::open(stores.registry.clone(), blobs, model.clone(), config.adapter_cache_mb.saturating_mul(1024 * 1024), &config.pinned_adapters)
                .await?,
        );
        let instance_id: Arc<str> = format!("{}-{}", config.role.as_str(), uuid::Uuid::new_v4().simple()).into();
        stores.instances.heartbeat(&instance_id, config.role.as_str()).await?;
        let jobs = Arc::new(JobQueue::new(config.queue_capacity, config.workers, config.job_history, stores.images.clone(), instance_id.clone()));
        let reward_models = RewardModels::new(config.reward_models.clone());
        Ok(Self {
            model_id: config.model_id().into(),
            config: Arc::new(config),
            instance_id,
            model,
            stores,
            adapters,
            jobs,
            reward_models,
            started: crate::stores::unix_now(),
            stopping: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The model, or a 503 while it loads.
    pub fn ready_model(&self) -> Result<Arc<StableDiffusion>, ApiError> {
        match self.model.status() {
            ModelStatus::Ready(m) => Ok(m),
            ModelStatus::Loading => Err(ApiError::unavailable("the model is still loading; retry shortly", 5)),
            ModelStatus::Failed(e) => Err(ApiError::unavailable(format!("the model failed to load: {e}"), 60).code("model_load_failed")),
        }
    }
}
