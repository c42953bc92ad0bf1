//! `POST /v1/images/generations` (OpenAI-compatible, synchronous) and the shared submission
//! path used by the job API.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use utoipa::IntoResponses;

use crate::server::api::{ImageGenerationRequest, ImagesResponse};
use crate::server::error::{ApiError, ErrorResponse, ErrorType};
use crate::server::extract::ApiJson;
use crate::server::jobs::{Job, JobOutcome, JobQueue, SubmitError};
use crate::server::params::{self, Validated};
use crate::server::state::AppState;

/// The refusals every queued image request (generation, edit, job) may get.
#[derive(IntoResponses)]
pub enum QueueRefusals {
    #[response(status = 401, description = "Missing or wrong API key")]
    Unauthorized(ErrorResponse),
    #[response(status = 404, description = "A requested adapter does not exist")]
    AdapterNotFound(ErrorResponse),
    #[response(status = 429, description = "The queue is full",
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying")))]
    QueueFull(ErrorResponse),
    #[response(status = 503, description = "The model is still loading",
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying")))]
    Loading(ErrorResponse),
}

/// Validates a request, resolves its adapters and queues it; `retained` jobs stay pollable
/// after they end.
pub async fn submit(
    state: &AppState,
    req: ImageGenerationRequest,
    retained: bool,
) -> Result<Arc<Job>, ApiError> {
    let model = state.ready_model()?;
    let validated = params::validate(&state.config, &state.model_id, &model, &req)?;
    enqueue(state, validated, retained).await
}

/// Resolves a validated request's adapters, records a retained job and queues it.
pub async fn enqueue(state: &AppState, validated: Validated, retained: bool) -> Result<Arc<Job>, ApiError> {
    let spec = params::resolve_loras(&state.adapters, validated).await?;
    let mut job = Job::new(spec, retained);
    if retained {
        state.jobs.save_new(&mut job).await.map_err(|e| ApiError::internal(format!("cannot save the job: {e:#}")))?;
    }
    let submitted = state.jobs.submit(job.clone());
    if submitted.is_err() && retained {
        if let Err(e) = state.jobs.records().delete(&job.id).await {
            tracing::warn!(job = %job.id, "cannot delete the record of a refused job: {e:#}");
        }
    }
    submitted.map_err(|e| match e {
        SubmitError::Full { retry_after, capacity } => ApiError::rate_limited(
            format!("the generation queue is full ({capacity} jobs waiting); retry after {retry_after} s"),
            retry_after,
        ),
        SubmitError::Closed => ApiError::unavailable("the server is shutting down", 5).code("shutting_down"),
    })?;
    tracing::debug!(job = %job.id, "queued");
    Ok(job)
}

/// Cancels the job if the request future is dropped (the client went away) before it ended.
struct CancelOnDrop {
    queue: Arc<JobQueue>,
    id: Option<String>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            tracing::info!(job = %id, "client disconnected; cancelling");
            self.queue.cancel(&id);
        }
    }
}

/// Create images (OpenAI `images.generate`).
///
/// Runs through the same queue as the job API and answers when the images are ready. Only
/// `b64_json` output. Extension fields (`negative_prompt`, `steps`, `guidance_scale`, `seed`,
/// `scheduler`, `eta`, `loras`) go at the top level of the body (OpenAI SDKs: `extra_body`).
/// If the client disconnects, the job is cancelled.
#[utoipa::path(
    post,
    path = "/v1/images/generations",
    tag = "images",
    operation_id = "create_image",
    request_body = ImageGenerationRequest,
    responses(
        (status = 200, description = "The images, their seeds and the effective parameters", body = ImagesResponse),
        (status = 400, description = "Malformed JSON or a value out of range", body = ErrorResponse),
        (status = 500, description = "Generation failed", body = ErrorResponse),
        QueueRefusals,
    ),
    security(("bearer" = []))
)]
pub async fn create_image(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<ImageGenerationRequest>,
) -> Result<Json<ImagesResponse>, ApiError> {
    let job = submit(&state, req, false).await?;
    respond(&state, job).await
}

/// Waits for a synchronous job and answers with its images (cancelling it if the client
/// goes away first).
pub async fn respond(state: &AppState, job: Arc<Job>) -> Result<Json<ImagesResponse>, ApiError> {
    let mut guard = CancelOnDrop {
        queue: state.jobs.clone(),
        id: Some(job.id.clone()),
    };
    let outcome = job.wait().await;
    guard.id = None;
    match outcome {
        JobOutcome::Succeeded(r) => Ok(Json(Arc::unwrap_or_clone(r))),
        JobOutcome::Failed(e) => Err(ApiError::internal(e.message).code(e.code)),
        JobOutcome::Cancelled(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::ServiceUnavailableError,
            e.message,
        )
        .code("cancelled")),
    }
}
