//! The /align job API: submit an AlignProp run, list, poll, cancel, follow its events, and
//! list the rewards.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use utoipa::{IntoParams, ToSchema};

use crate::align::jobs::{AlignEvent, AlignJob, AlignJobs, CancelError};
use crate::align::request::{AlignLimits, AlignRequest};
use crate::engine::noise::random_seed;
use crate::rewards::registry::{build_all, REWARDS};
use crate::server::adapters::{valid_name, AdapterError};
use crate::server::error::{ApiError, ErrorResponse};
use crate::server::extract::{ApiJson, ApiPath, ApiQuery};
use crate::server::state::AppState;

/// `GET /v1/align/jobs`.
#[derive(Serialize, ToSchema)]
pub struct AlignJobList {
    /// Always `list`.
    pub object: String,
    /// Newest first.
    pub data: Vec<AlignJob>,
}

/// `GET /v1/align/jobs/{id}/events` as JSON.
#[derive(Serialize, ToSchema)]
pub struct AlignEventList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<AlignEvent>,
}

/// One server-sent event of `GET /v1/align/jobs/{id}/events?stream=true`: the
/// `text/event-stream` body is a sequence of these, each as `event:`, `id:` and `data:` lines.
#[derive(ToSchema)]
pub struct AlignJobStreamEvent {
    /// The event's `type`.
    pub event: String,
    /// The event's `id`.
    pub id: String,
    /// The event, as JSON.
    pub data: AlignEvent,
}

/// A reward a job may name.
#[derive(Serialize, ToSchema)]
pub struct RewardDescription {
    pub name: String,
    pub description: String,
}

/// `GET /v1/align/rewards`.
#[derive(Serialize, ToSchema)]
pub struct RewardList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<RewardDescription>,
}

/// Query of the events endpoint.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events with a larger id (default 0: all).
    #[serde(default)]
    #[param(required = false)]
    pub after: u64,
    /// Answer with server-sent events (also chosen by `Accept: text/event-stream`).
    #[serde(default)]
    #[param(required = false)]
    pub stream: bool,
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no align job {id:?}")).code("job_not_found")
}

/// Everything that would make the job fail at once is a 4xx now.
fn validate(state: &AppState, req: &AlignRequest, seed: u64) -> Result<(), ApiError> {
    if !valid_name(&req.adapter_name) {
        return Err(ApiError::from(AdapterError::InvalidName(req.adapter_name.clone())).param("adapter_name"));
    }
    if state.adapters.exists(&req.adapter_name) && !req.overwrite {
        return Err(ApiError::conflict(format!("adapter {:?} already exists; set \"overwrite\": true to replace it", req.adapter_name))
            .param("adapter_name")
            .code("adapter_exists"));
    }
    if state.align.list().iter().any(|j| !j.status.is_terminal() && j.adapter_name == req.adapter_name) {
        return Err(ApiError::conflict(format!("another align job is already writing adapter {:?}", req.adapter_name))
            .param("adapter_name")
            .code("adapter_busy"));
    }
    req.to_config(&AlignLimits::default(), seed).map_err(|(param, message)| ApiError::invalid(param, message))?;
    req.check_model(&*state.ready_model()?).map_err(|(param, message)| ApiError::invalid(param, message))?;
    build_all(&req.rewards, &state.reward_models).map_err(|e| ApiError::invalid("rewards", format!("{e:#}")))?;
    if let Some(init) = &req.init_adapter {
        if !state.adapters.exists(init) {
            return Err(ApiError::not_found(format!("init_adapter {init:?} not found")).param("init_adapter").code("adapter_not_found"));
        }
    }
    Ok(())
}

/// Start an AlignProp run.
///
/// Validates the request (400 for bad values, including sizes the trainer cannot do and
/// prompts longer than the text encoder sees; 404 for a missing `init_adapter`; 409 when the
/// adapter exists without `overwrite`; 503 while the model loads) and queues the job: 202
/// with the job object. On success the adapter is written to
/// `adapters/<adapter_name>.safetensors` and is usable at once. `POST /align` is the same
/// endpoint.
#[utoipa::path(
    post,
    path = "/v1/align/jobs",
    tag = "align",
    operation_id = "create_align_job",
    request_body = AlignRequest,
    responses(
        (status = 202, description = "Queued", body = AlignJob,
            headers(("Location" = String, description = "The job's URL"))),
        (status = 400, description = "Malformed JSON or an invalid value", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "`init_adapter` does not exist", body = ErrorResponse),
        (status = 409, description = "The adapter exists (no `overwrite`) or another job writes it", body = ErrorResponse),
        (status = 503, description = "The model is still loading", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    ),
    security(("bearer" = []))
)]
pub async fn create_align_job(State(state): State<AppState>, ApiJson(req): ApiJson<AlignRequest>) -> Result<Response, ApiError> {
    let seed = req.seed.unwrap_or_else(random_seed);
    let job = tokio::task::spawn_blocking(move || {
        validate(&state, &req, seed)?;
        state.align.submit(req, seed).map_err(|e| ApiError::internal(format!("cannot queue the job: {e:#}")))
    })
    .await??;
    let mut response = (StatusCode::ACCEPTED, Json(&job)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/align/jobs/{}", job.id)) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

/// List align jobs, newest first.
#[utoipa::path(
    get,
    path = "/v1/align/jobs",
    tag = "align",
    operation_id = "list_align_jobs",
    responses(
        (status = 200, description = "Every job this server knows (records persist across restarts)", body = AlignJobList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn list_align_jobs(State(state): State<AppState>) -> Json<AlignJobList> {
    Json(AlignJobList { object: "list".into(), data: state.align.list() })
}

/// Get an align job: status, queue position, reward curve, error and, on success, the
/// adapter name (`fine_tuned_adapter`).
#[utoipa::path(
    get,
    path = "/v1/align/jobs/{id}",
    tag = "align",
    operation_id = "get_align_job",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = AlignJob),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "No such job", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn get_align_job(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Json<AlignJob>, ApiError> {
    state.align.get(&id).map(Json).ok_or_else(|| not_found(&id))
}

/// Cancel an align job: a queued one at once, a running one after its current optimisation
/// step (no adapter is written). A finished job gives 409.
#[utoipa::path(
    post,
    path = "/v1/align/jobs/{id}/cancel",
    tag = "align",
    operation_id = "cancel_align_job",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled, or cancelling", body = AlignJob),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "No such job", body = ErrorResponse),
        (status = 409, description = "The job has already finished", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn cancel_align_job(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Json<AlignJob>, ApiError> {
    match state.align.cancel(&id) {
        Ok(job) => Ok(Json(job)),
        Err(CancelError::NotFound) => Err(not_found(&id)),
        Err(CancelError::Terminal(status)) => {
            Err(ApiError::conflict(format!("job {id} has already finished ({})", status.as_str())).code("job_finished"))
        }
    }
}

/// A job's events: state changes and one `metrics` event per optimisation step (reward
/// mean/std, loss, gradient norm, seconds).
///
/// JSON by default; with `stream=true` or `Accept: text/event-stream`, server-sent events
/// (event name = the event's `type`, `id` = its id, `data` = the event) that end after the
/// job's final event.
#[utoipa::path(
    get,
    path = "/v1/align/jobs/{id}/events",
    tag = "align",
    operation_id = "align_job_events",
    params(("id" = String, Path, description = "Job id"), EventsQuery),
    responses(
        (status = 200, description = "The events (JSON list, or an event stream)",
            content((AlignEventList = "application/json"), (AlignJobStreamEvent = "text/event-stream"))),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "No such job", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn align_job_events(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let wants_stream = query.stream
        || headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"));
    if wants_stream {
        let stream = event_stream(state.align.clone(), id.clone(), query.after).ok_or_else(|| not_found(&id))?;
        return Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response());
    }
    let job = state.align.get(&id).ok_or_else(|| not_found(&id))?;
    let data = job.events.into_iter().filter(|e| e.id > query.after).collect();
    Ok(Json(AlignEventList { object: "list".into(), data }).into_response())
}

fn sse(event: &AlignEvent) -> Result<Event, Infallible> {
    Ok(Event::default()
        .event(event.kind.clone())
        .id(event.id.to_string())
        .json_data(event)
        .unwrap_or_else(|_| Event::default().event("error").data("serialisation failed")))
}

/// The job's events after `after`, then live ones until its last event.
fn event_stream(jobs: Arc<AlignJobs>, id: String, after: u64) -> Option<impl Stream<Item = Result<Event, Infallible>>> {
    struct Cursor {
        jobs: Arc<AlignJobs>,
        id: String,
        rx: tokio::sync::broadcast::Receiver<(String, AlignEvent)>,
        backlog: VecDeque<AlignEvent>,
        last: u64,
        done: bool,
    }
    impl Cursor {
        /// Queues the recorded events not sent yet; notes whether the job is over.
        fn catch_up(&mut self) -> bool {
            let Some(job) = self.jobs.get(&self.id) else { return false };
            self.backlog.extend(job.events.into_iter().filter(|e| e.id > self.last));
            if let Some(e) = self.backlog.back() {
                self.last = e.id;
            }
            self.done = job.status.is_terminal();
            true
        }
    }
    let rx = jobs.subscribe();
    let mut cursor = Cursor { jobs, id, rx, backlog: VecDeque::new(), last: after, done: false };
    if !cursor.catch_up() {
        return None;
    }
    Some(stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(e) = c.backlog.pop_front() {
                return Some((sse(&e), c));
            }
            if c.done {
                return None;
            }
            match c.rx.recv().await {
                Ok((job_id, _)) if job_id != c.id => {}
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    c.catch_up();
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }))
}

/// List the rewards a job may name (model-based ones need their weights under
/// `--reward-models`).
#[utoipa::path(
    get,
    path = "/v1/align/rewards",
    tag = "align",
    operation_id = "list_rewards",
    responses(
        (status = 200, description = "The reward registry", body = RewardList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn list_rewards() -> Json<RewardList> {
    let data = REWARDS.iter().map(|r| RewardDescription { name: r.name.into(), description: r.description.into() }).collect();
    Json(RewardList { object: "list".into(), data })
}
