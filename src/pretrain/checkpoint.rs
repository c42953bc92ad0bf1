//! Resumable training: the step reached, saved next to the weights it belongs to, and the
//! step counting, progress and periodic saving every training loop shares.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use indicatif::ProgressBar;
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
    /// For the object counter trained on a model's samples: its agreement with the analytic
    /// evaluator on held-out samples of that model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_agreement: Option<f64>,
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

/// Steps between two saves.
const SAVE_EVERY: usize = 100;

/// Drives a resumable loop of `total` steps: counts steps, shows them on a progress bar (or,
/// where the bar is hidden because stderr is not a terminal, logs a line at each save) and
/// saves every [`SAVE_EVERY`] steps and at the end.
pub struct Checkpointer<'a> {
    pub state: TrainState,
    dir: PathBuf,
    total: usize,
    bar: &'a ProgressBar,
    last_save: Instant,
}

impl<'a> Checkpointer<'a> {
    /// Resumes from the state in `dir` when every file of `weights` exists (the caller loads
    /// them when [`Self::resuming`]); starts at step 0 otherwise.
    pub fn open(dir: &Path, weights: &[&Path], total: usize, bar: &'a ProgressBar) -> Result<Self> {
        let state = match TrainState::load(dir)? {
            Some(state) if weights.iter().all(|w| w.is_file()) => state,
            _ => TrainState::default(),
        };
        bar.set_length(total as u64);
        bar.set_position(state.step as u64);
        Ok(Self { state, dir: dir.to_path_buf(), total, bar, last_save: Instant::now() })
    }

    /// Whether earlier steps were taken, so their weights must be loaded.
    pub fn resuming(&self) -> bool {
        self.state.step > 0
    }

    /// The next step's index.
    pub fn step(&self) -> usize {
        self.state.step
    }

    /// Whether steps remain.
    pub fn running(&self) -> bool {
        self.state.step < self.total
    }

    /// Counts a finished step that reached `loss`, shown with `message`; when a save is due,
    /// adds the time spent, writes the weights with `save` and then the state.
    pub fn advance(&mut self, loss: f64, message: String, save: impl FnOnce() -> Result<()>) -> Result<()> {
        self.state.step += 1;
        self.state.last_loss = loss;
        self.bar.set_position(self.state.step as u64);
        if self.state.step.is_multiple_of(SAVE_EVERY) || self.state.step == self.total {
            self.state.seconds += self.last_save.elapsed().as_secs_f64();
            self.last_save = Instant::now();
            save()?;
            self.state.save(&self.dir)?;
            if self.bar.is_hidden() {
                eprintln!("{} step {}/{}, {message}, {:.0} s", self.bar.prefix(), self.state.step, self.total, self.state.seconds);
            }
        }
        self.bar.set_message(message);
        Ok(())
    }
}
