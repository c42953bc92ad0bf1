//! `/align` jobs as the API shows them: status, reward curve and event log. They are stored
//! and queued by `crate::stores::align_jobs` and run by the server's trainers.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::request::AlignRequest;
use super::trainer::StepReport;

/// Lifecycle of a job (OpenAI fine-tuning spelling).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlignStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl AlignStatus {
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Queued, Self::Running, Self::Succeeded, Self::Failed, Self::Cancelled].into_iter().find(|v| v.as_str() == s)
    }

    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AlignStatus::Queued => "queued",
            AlignStatus::Running => "running",
            AlignStatus::Succeeded => "succeeded",
            AlignStatus::Failed => "failed",
            AlignStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, AlignStatus::Succeeded | AlignStatus::Failed | AlignStatus::Cancelled)
    }
}

/// Why a job failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AlignError {
    /// `interrupted`, `non_finite`, `invalid_request` or `training_failed`.
    pub code: String,
    pub message: String,
}

/// One entry of a job's event log.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AlignEvent {
    pub id: u64,
    pub created_at: u64,
    /// `message` for state changes, `metrics` for an optimisation step, and last the job's
    /// final status: `succeeded`, `failed` or `cancelled` (the event stream ends after it).
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<StepReport>,
}

/// A job as stored and returned by the API.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AlignJob {
    /// Always `align.job`.
    pub object: String,
    pub id: String,
    pub status: AlignStatus,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    /// The adapter this job writes.
    pub adapter_name: String,
    /// Set on success: the adapter name, usable in generation requests at once.
    pub fine_tuned_adapter: Option<String>,
    /// The seed used (drawn when the request gave none).
    pub seed: u64,
    /// Completed optimisation steps and the requested total.
    pub step: usize,
    pub total_steps: usize,
    /// Reward curve: one entry per optimisation step.
    pub metrics: Vec<StepReport>,
    pub stop_reason: Option<String>,
    pub error: Option<AlignError>,
    /// Position in the queue (1 = next) while queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<usize>,
    pub request: AlignRequest,
    /// State changes and steps, in order.
    #[serde(default)]
    pub events: Vec<AlignEvent>,
}
