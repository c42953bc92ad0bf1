//! The native async job API: submit, poll, cancel, server-sent events.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};

use super::edits::submit_edit;
use super::images::submit;
use crate::server::api::{ImageEditForm, ImageGenerationRequest, ImageJob, ImageJobStreamEvent, JobStatus};
use crate::server::edit_form::EditForm;
use crate::server::error::{ApiError, ErrorResponse};
use crate::server::extract::{ApiJson, ApiPath};
use crate::server::jobs::{CancelOutcome, Job, JobQueue};
use crate::server::state::AppState;

fn find(state: &AppState, id: &str) -> Result<Arc<Job>, ApiError> {
    state.jobs.get(id).ok_or_else(|| {
        ApiError::not_found(format!(
            "no image job {id:?} (finished jobs are kept for a while only)"
        ))
        .code("job_not_found")
    })
}

/// A job submission: a generation (JSON) or an edit (`multipart/form-data`).
pub enum JobRequest {
    Generation(ImageGenerationRequest),
    Edit(EditForm),
}

impl<S: Send + Sync> FromRequest<S> for JobRequest {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let multipart = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("multipart/form-data"));
        Ok(if multipart {
            JobRequest::Edit(EditForm::from_request(req, state).await?)
        } else {
            JobRequest::Generation(ApiJson::from_request(req, state).await?.0)
        })
    }
}

/// Submit an image job.
///
/// A JSON body as `POST /v1/images/generations`, or a `multipart/form-data` body as
/// `POST /v1/images/edits` for an edit; answers at once with 202 and the job, whose
/// `poll_url`, `events_url` and `cancel_url` lead on.
#[utoipa::path(
    post,
    path = "/v1/images/jobs",
    tag = "jobs",
    operation_id = "create_image_job",
    request_body(content(
        (ImageGenerationRequest = "application/json"),
        (ImageEditForm = "multipart/form-data"),
    )),
    responses(
        (status = 202, description = "Queued", body = ImageJob,
            headers(("Location" = String, description = "The job's URL"))),
        (status = 400, description = "Malformed JSON or a value out of range", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "A requested adapter does not exist", body = ErrorResponse),
        (status = 429, description = "The queue is full", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 503, description = "The model is still loading", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = []))
)]
pub async fn create_job(State(state): State<AppState>, req: JobRequest) -> Result<Response, ApiError> {
    let job = match req {
        JobRequest::Generation(req) => submit(&state, req, true).await?,
        JobRequest::Edit(form) => submit_edit(&state, form, true).await?,
    };
    let view = state.jobs.view(&job, false);
    let mut response = (StatusCode::ACCEPTED, Json(view)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/images/jobs/{}", job.id)) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

/// Get an image job: status, progress, queue position, and the result once `succeeded`.
#[utoipa::path(
    get,
    path = "/v1/images/jobs/{id}",
    tag = "jobs",
    operation_id = "get_image_job",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = ImageJob),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "No such job", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn get_job(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ImageJob>, ApiError> {
    let job = find(&state, &id)?;
    Ok(Json(state.jobs.view(&job, true)))
}

/// Cancel an image job.
///
/// A queued job is cancelled at once (`status: cancelled`); a running one stops at its next
/// denoising step (`cancel_requested: true` until then). A finished job gives 409.
#[utoipa::path(
    post,
    path = "/v1/images/jobs/{id}/cancel",
    tag = "jobs",
    operation_id = "cancel_image_job",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled, or cancelling", body = ImageJob),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "No such job", body = ErrorResponse),
        (status = 409, description = "The job has already finished", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn cancel_job(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ImageJob>, ApiError> {
    let job = find(&state, &id)?;
    match state.jobs.cancel(&id) {
        CancelOutcome::Cancelled | CancelOutcome::Requested => {
            Ok(Json(state.jobs.view(&job, false)))
        }
        CancelOutcome::AlreadyFinished(status) => Err(ApiError::conflict(format!(
            "job {id} has already finished ({})",
            status.as_str()
        ))
        .code("job_finished")),
        CancelOutcome::NotFound => {
            Err(ApiError::not_found(format!("no image job {id:?}")).code("job_not_found"))
        }
    }
}

fn event_name(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Running => "progress",
        other => other.as_str(),
    }
}

fn job_events_stream(
    queue: Arc<JobQueue>,
    job: Arc<Job>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let rx = job.subscribe();
    stream::unfold(
        (queue, job, rx, true, false),
        |(queue, job, mut rx, first, finished)| async move {
            if finished {
                return None;
            }
            if !first && rx.changed().await.is_err() {
                return None;
            }
            let version = *rx.borrow_and_update();
            let status = job.status();
            let view = queue.view(&job, status == JobStatus::Succeeded);
            let event = Event::default()
                .event(event_name(view.status))
                .id(version.to_string())
                .json_data(&view)
                .unwrap_or_else(|_| Event::default().event("error").data("serialisation failed"));
            let finished = view.status.is_terminal();
            Some((Ok(event), (queue, job, rx, false, finished)))
        },
    )
}

/// Follow an image job as server-sent events.
///
/// Each event carries the job object (as `GET /v1/images/jobs/{id}`) in `data`. Event names:
/// `queued`, `progress` (running; one per step, coalesced when the client is slow), then one
/// terminal `succeeded` (with `result`), `failed` or `cancelled`, after which the stream ends.
#[utoipa::path(
    get,
    path = "/v1/images/jobs/{id}/events",
    tag = "jobs",
    operation_id = "image_job_events",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Server-sent events, one per change of the job", content_type = "text/event-stream", body = ImageJobStreamEvent),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "No such job", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn job_events(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let job = find(&state, &id)?;
    let stream = job_events_stream(state.jobs.clone(), job);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
