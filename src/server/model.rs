//! The served model, loaded in the background: `Loading` → `Ready` or `Failed`.

use std::sync::Arc;

use tokio::sync::watch;

use crate::engine::pipeline::StableDiffusion;

/// Where model loading stands.
#[derive(Clone)]
pub enum ModelStatus {
    Loading,
    Ready(Arc<StableDiffusion>),
    Failed(String),
}

/// A cheaply clonable handle on the model that becomes ready once loading finishes.
#[derive(Clone)]
pub struct ModelSlot {
    tx: Arc<watch::Sender<ModelStatus>>,
}

impl Default for ModelSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelSlot {
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel(ModelStatus::Loading).0),
        }
    }

    /// A slot that is ready at once (embedding an already loaded model).
    pub fn ready(model: Arc<StableDiffusion>) -> Self {
        Self {
            tx: Arc::new(watch::channel(ModelStatus::Ready(model)).0),
        }
    }

    pub fn status(&self) -> ModelStatus {
        self.tx.borrow().clone()
    }

    /// The model, once loaded.
    pub fn get(&self) -> Option<Arc<StableDiffusion>> {
        match &*self.tx.borrow() {
            ModelStatus::Ready(m) => Some(m.clone()),
            _ => None,
        }
    }

    pub fn set(&self, status: ModelStatus) {
        self.tx.send_replace(status);
    }

    /// Waits until loading has finished; `Err` with the reason when it failed.
    pub async fn wait(&self) -> Result<Arc<StableDiffusion>, String> {
        let mut rx = self.tx.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                ModelStatus::Ready(m) => return Ok(m.clone()),
                ModelStatus::Failed(e) => return Err(e.clone()),
                ModelStatus::Loading => {}
            }
            if rx.changed().await.is_err() {
                return Err("model slot dropped".into());
            }
        }
    }
}
