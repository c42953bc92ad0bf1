//! The native async job API: submit, poll, cancel, server-sent events.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};

use super::edits::submit_edit;
use super::events::{last_event_id, next_change};
use super::images::{submit, QueueRefusals};
use crate::server::api::{ImageEditForm, ImageGenerationRequest, ImageJob, ImageJobStreamEvent, JobStatus};
use crate::server::edit_form::EditForm;
use crate::server::error::{ApiError, ErrorResponse};
use crate::server::extract::{ApiJson, ApiPath};
use crate::server::jobs::{view_record, CancelOutcome, Job, JobQueue};
use crate::server::state::AppState;
use crate::stores::image_jobs::ImageJobRecord;

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no image job {id:?} (finished jobs are kept for a while only)")).code("job_not_found")
}

fn store_error(e: anyhow::Error) -> ApiError {
    ApiError::internal(format!("job store error: {e:#}"))
}

/// Where a job is: in this process, or only in the shared table (another replica runs it, or
/// it ended before a restart).
enum Found {
    Here(Arc<Job>),
    Stored(Box<ImageJobRecord>),
}

async fn find(state: &AppState, id: &str) -> Result<Found, ApiError> {
    if let Some(job) = state.jobs.get(id) {
        return Ok(Found::Here(job));
    }
    match state.jobs.records().get(id).await.map_err(store_error)? {
        // This process's own jobs it no longer holds were pruned: the record follows shortly.
        Some(r) if r.owner != state.jobs.owner() => Ok(Found::Stored(Box::new(r))),
        _ => Err(not_found(id)),
    }
}

fn stored_view(r: &ImageJobRecord, with_result: bool) -> Result<ImageJob, ApiError> {
    view_record(r, with_result).map_err(store_error)
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
        (status = 400, description = "Malformed JSON or form, an unreadable image or a value out of range", body = ErrorResponse),
        (status = 413, description = "An edit form larger than `--max-image-upload-mb`", body = ErrorResponse),
        QueueRefusals,
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
    match find(&state, &id).await? {
        Found::Here(job) => Ok(Json(state.jobs.view(&job, true))),
        Found::Stored(r) => Ok(Json(stored_view(&r, true)?)),
    }
}

/// Cancel an image job.
///
/// A queued job is cancelled at once (`status: cancelled`); a running one stops at its next
/// denoising step (`cancel_requested: true` until then; on another replica than the one
/// running it, within its poll interval). A finished job gives 409.
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
    let job = match find(&state, &id).await? {
        Found::Here(job) => job,
        Found::Stored(r) => {
            if let Some(status) = JobStatus::parse(&r.status).filter(|s| s.is_terminal()) {
                return Err(finished(&id, status));
            }
            let r = state.jobs.records().request_cancel(&id).await.map_err(store_error)?.ok_or_else(|| not_found(&id))?;
            return Ok(Json(stored_view(&r, false)?));
        }
    };
    match state.jobs.cancel(&id) {
        CancelOutcome::Cancelled | CancelOutcome::Requested => {
            Ok(Json(state.jobs.view(&job, false)))
        }
        CancelOutcome::AlreadyFinished(status) => Err(finished(&id, status)),
        CancelOutcome::NotFound => {
            Err(ApiError::not_found(format!("no image job {id:?}")).code("job_not_found"))
        }
    }
}

fn finished(id: &str, status: JobStatus) -> ApiError {
    ApiError::conflict(format!("job {id} has already finished ({})", status.as_str())).code("job_finished")
}

fn event_name(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Running => "progress",
        other => other.as_str(),
    }
}

fn sse(view: &ImageJob, version: u64) -> Result<Event, Infallible> {
    Ok(Event::default()
        .event(event_name(view.status))
        .id(version.to_string())
        .json_data(view)
        .unwrap_or_else(|_| Event::default().event("error").data("serialisation failed")))
}

/// A job of this process: one event per version after `after`, coalesced when the client is
/// slow, until the terminal one.
fn local_stream(queue: Arc<JobQueue>, job: Arc<Job>, after: Option<u64>) -> impl Stream<Item = Result<Event, Infallible>> {
    let rx = job.subscribe();
    stream::unfold((queue, job, rx, after, false), |(queue, job, mut rx, after, finished)| async move {
        if finished {
            return None;
        }
        loop {
            let version = *rx.borrow_and_update();
            let status = job.status();
            if after.is_none_or(|a| version > a) {
                let view = queue.view(&job, status == JobStatus::Succeeded);
                let finished = view.status.is_terminal();
                return Some((sse(&view, version), (queue, job, rx, Some(version), finished)));
            }
            if status.is_terminal() || rx.changed().await.is_err() {
                return None;
            }
        }
    })
}

/// A job of another replica (or from before a restart), followed through its record.
fn stored_stream(state: AppState, id: String, after: Option<u64>) -> impl Stream<Item = Result<Event, Infallible>> {
    let changes = state.stores.db.subscribe();
    stream::unfold((state, id, changes, after, false), |(state, id, mut changes, after, finished)| async move {
        if finished {
            return None;
        }
        loop {
            let record = match state.jobs.records().get(&id).await {
                Ok(Some(r)) => r,
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(job = %id, "cannot read the job: {e:#}");
                    next_change(&mut changes, &id, state.config.stores.poll_interval()).await;
                    continue;
                }
            };
            let terminal = JobStatus::parse(&record.status).is_none_or(|s| s.is_terminal());
            if after.is_none_or(|a| record.version > a) {
                let view = match view_record(&record, record.status == "succeeded") {
                    Ok(v) => v,
                    Err(_) => return None,
                };
                let version = record.version;
                return Some((sse(&view, version), (state, id, changes, Some(version), terminal)));
            }
            if terminal {
                return None;
            }
            next_change(&mut changes, &id, state.config.stores.poll_interval()).await;
        }
    })
}

/// Follow an image job as server-sent events.
///
/// Each event carries the job object (as `GET /v1/images/jobs/{id}`) in `data` and the job's
/// state version as its `id`. Event names: `queued`, `progress` (running; one per step,
/// coalesced when the client is slow), then one terminal `succeeded` (with `result`),
/// `failed` or `cancelled`, after which the stream ends. A reconnecting client sends
/// `Last-Event-ID` and gets only newer states (nothing, once it has the terminal one). Works
/// on any replica (another replica's job is followed through the shared job table).
#[utoipa::path(
    get,
    path = "/v1/images/jobs/{id}/events",
    tag = "jobs",
    operation_id = "image_job_events",
    params(("id" = String, Path, description = "Job id"),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id (sent by reconnecting EventSource clients)")),
    responses(
        (status = 200, description = "Server-sent events, one per change of the job, ending with the terminal one", content_type = "text/event-stream", body = ImageJobStreamEvent),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "No such job", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn job_events(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let after = last_event_id(&headers);
    let response = match find(&state, &id).await? {
        Found::Here(job) => Sse::new(local_stream(state.jobs.clone(), job, after).boxed()),
        Found::Stored(_) => Sse::new(stored_stream(state, id, after).boxed()),
    };
    Ok(response.keep_alive(KeepAlive::default()).into_response())
}
