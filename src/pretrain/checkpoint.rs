//! Resumable training state: the step reached, next to the weights it belongs to.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// `<dir>/train_state.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainState {
    pub step: usize,
    pub seconds: f64,
    pub last_loss: f64,
    /// The final held-out measurement, for stages that make one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out_accuracy: Option<f64>,
}

impl TrainState {
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("train_state.json");
        if !path.is_file() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(&std::fs::read_to_string(path)?)?))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join("train_state.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)?;
        std::fs::rename(tmp, dir.join("train_state.json"))?;
        Ok(())
    }
}
