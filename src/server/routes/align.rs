//! The /align job API: submit an AlignProp run, list, poll, cancel, follow its events, and
//! list the rewards.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::events::{last_event_id, next_change};
use crate::align::jobs::{AlignEvent, AlignJob};
use crate::align::request::{AlignLimits, AlignRequest};
use crate::noise::random_seed;
use crate::rewards::registry::{build_all, REWARDS};
use crate::server::adapters::AdapterError;
use crate::server::error::{ApiError, ErrorResponse};
use crate::server::extract::{ApiJson, ApiPath, ApiQuery};
use crate::server::state::AppState;
use crate::stores::align_jobs::CancelError;
use crate::stores::registry::valid_name;

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
    /// Only events with a larger id (default 0: all; a `Last-Event-ID` header, as sent by a
    /// reconnecting EventSource, counts too: the larger of the two wins).
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

fn db_error(e: anyhow::Error) -> ApiError {
    ApiError::internal(format!("job store error: {e:#}"))
}

/// Everything that would make the job fail at once is a 4xx now; an unset size becomes the
/// model's native size, so the job record names the size it trains at.
async fn validate(state: &AppState, req: &mut AlignRequest, seed: u64) -> Result<(), ApiError> {
    if !valid_name(&req.adapter_name) {
        return Err(ApiError::from(AdapterError::InvalidName(req.adapter_name.clone())).param("adapter_name"));
    }
    if state.adapters.exists(&req.adapter_name).await && !req.overwrite {
        return Err(ApiError::conflict(format!("adapter {:?} already exists; set \"overwrite\": true to replace it", req.adapter_name))
            .param("adapter_name")
            .code("adapter_exists"));
    }
    if state.stores.align.adapter_busy(&req.adapter_name).await.map_err(db_error)? {
        return Err(ApiError::conflict(format!("another align job is already writing adapter {:?}", req.adapter_name))
            .param("adapter_name")
            .code("adapter_busy"));
    }
    let model = state.ready_model()?;
    let (width, height) = req.size(model.native_size());
    (req.width, req.height) = (Some(width), Some(height));
    req.to_config(&AlignLimits::default(), seed, model.native_size()).map_err(|(param, message)| ApiError::invalid(param, message))?;
    req.check_model(&model).map_err(|(param, message)| ApiError::invalid(param, message))?;
    build_all(&req.rewards, &state.reward_models).map_err(|e| ApiError::invalid("rewards", format!("{e:#}")))?;
    if let Some(init) = &req.init_adapter {
        if !state.adapters.exists(init).await {
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
/// with the job object; `width` and `height` default to the model's native size. On success
/// the adapter is written to `adapters/<adapter_name>.safetensors` and is usable at once.
/// `POST /align` is the same endpoint.
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
pub async fn create_align_job(State(state): State<AppState>, ApiJson(mut req): ApiJson<AlignRequest>) -> Result<Response, ApiError> {
    let seed = req.seed.unwrap_or_else(random_seed);
    validate(&state, &mut req, seed).await?;
    let job = state.stores.align.submit(&req, seed).await.map_err(|e| ApiError::internal(format!("cannot queue the job: {e:#}")))?;
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
        (status = 200, description = "Every job of the deployment, from any replica (records persist across restarts); `events` are left out here", body = AlignJobList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn list_align_jobs(State(state): State<AppState>) -> Result<Json<AlignJobList>, ApiError> {
    Ok(Json(AlignJobList { object: "list".into(), data: state.stores.align.list().await.map_err(db_error)? }))
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
    state.stores.align.get(&id).await.map_err(db_error)?.map(Json).ok_or_else(|| not_found(&id))
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
    match state.stores.align.cancel(&id).await.map_err(db_error)? {
        Ok(job) => Ok(Json(job)),
        Err(CancelError::NotFound) => Err(not_found(&id)),
        Err(CancelError::Terminal(status)) => {
            Err(ApiError::conflict(format!("job {id} has already finished ({})", status.as_str())).code("job_finished"))
        }
    }
}

/// A job's events: state changes, one `metrics` event per optimisation step (reward
/// mean/std, loss, gradient norm, seconds) and last one whose type is the job's final status
/// (`succeeded`, `failed` or `cancelled`).
///
/// JSON by default; with `stream=true` or `Accept: text/event-stream`, server-sent events
/// (event name = the event's `type`, `id` = its id, `data` = the event) that end after the
/// final event. A reconnecting client sends `Last-Event-ID` and gets only the events after it,
/// none twice. Works on any replica, whichever trainer runs the job.
#[utoipa::path(
    get,
    path = "/v1/align/jobs/{id}/events",
    tag = "align",
    operation_id = "align_job_events",
    params(("id" = String, Path, description = "Job id"), EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id (sent by reconnecting EventSource clients)")),
    responses(
        (status = 200, description = "The events (JSON list, or an event stream ending with the final status event)",
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
    let after = query.after.max(last_event_id(&headers).unwrap_or(0));
    let wants_stream = query.stream
        || headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"));
    state.stores.align.status(&id).await.map_err(db_error)?.ok_or_else(|| not_found(&id))?;
    if wants_stream {
        return Ok(Sse::new(event_stream(state, id, after)).keep_alive(KeepAlive::default()).into_response());
    }
    let data = state.stores.align.events(&id, after).await.map_err(db_error)?;
    Ok(Json(AlignEventList { object: "list".into(), data }).into_response())
}

fn sse(event: &AlignEvent) -> Result<Event, Infallible> {
    Ok(Event::default()
        .event(event.kind.clone())
        .id(event.id.to_string())
        .json_data(event)
        .unwrap_or_else(|_| Event::default().event("error").data("serialisation failed")))
}

/// The job's events after `after`, then new ones as they are recorded (on any replica) until
/// its final event.
fn event_stream(state: AppState, id: String, after: u64) -> impl Stream<Item = Result<Event, Infallible>> {
    struct Cursor {
        state: AppState,
        id: String,
        changes: tokio::sync::broadcast::Receiver<crate::stores::Change>,
        backlog: VecDeque<AlignEvent>,
        last: u64,
        done: bool,
    }
    let changes = state.stores.db.subscribe();
    let cursor = Cursor { state, id, changes, backlog: VecDeque::new(), last: after, done: false };
    stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(e) = c.backlog.pop_front() {
                return Some((sse(&e), c));
            }
            if c.done {
                return None;
            }
            // Status first: the events read after a terminal status include the final one.
            let status = c.state.stores.align.status(&c.id).await;
            match (status, c.state.stores.align.events(&c.id, c.last).await) {
                (Ok(status), Ok(events)) => {
                    c.done = status.is_none_or(|s| s.is_terminal());
                    if let Some(e) = events.last() {
                        c.last = e.id;
                    }
                    c.backlog.extend(events);
                }
                (Err(e), _) | (_, Err(e)) => tracing::warn!("align job {} events: {e:#}", c.id),
            }
            if c.backlog.is_empty() && !c.done {
                next_change(&mut c.changes, &c.id, c.state.config.stores.poll_interval()).await;
            }
        }
    })
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
