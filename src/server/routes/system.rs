//! Models, probes, metrics, the OpenAPI document, and the error fallbacks.

use axum::extract::{OriginalUri, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::server::api::{Health, ModelInfo, ModelList, Readiness, ReadyStatus};
use crate::server::error::{ApiError, ErrorResponse, ErrorType};
use crate::server::extract::ApiPath;
use crate::server::model::ModelStatus;
use crate::server::state::AppState;

fn model_info(state: &AppState) -> ModelInfo {
    ModelInfo {
        id: state.model_id.to_string(),
        object: "model".into(),
        created: state.started,
        owned_by: "sdserve".into(),
        ready: state.model.get().is_some(),
        family: state.model.get().map(|m| m.family),
    }
}

/// List models (OpenAI `models.list`): the one served model.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "models",
    operation_id = "list_models",
    responses(
        (status = 200, description = "The served model", body = ModelList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![model_info(&state)],
    })
}

/// Get a model (OpenAI `models.retrieve`).
#[utoipa::path(
    get,
    path = "/v1/models/{id}",
    tag = "models",
    operation_id = "get_model",
    params(("id" = String, Path, description = "Model id")),
    responses(
        (status = 200, description = "The model", body = ModelInfo),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "No such model", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn get_model(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ModelInfo>, ApiError> {
    if id != *state.model_id {
        return Err(ApiError::not_found(format!(
            "no model {id:?}; this server serves {:?}",
            &*state.model_id
        ))
        .code("model_not_found"));
    }
    Ok(Json(model_info(&state)))
}

/// Liveness: 200 whenever the process answers.
#[utoipa::path(
    get,
    path = "/health",
    tag = "system",
    operation_id = "health",
    responses((status = 200, description = "Alive", body = Health))
)]
pub async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: 200 once the model is loaded, 503 before (or if loading failed).
#[utoipa::path(
    get,
    path = "/ready",
    tag = "system",
    operation_id = "ready",
    responses(
        (status = 200, description = "Ready to generate", body = Readiness),
        (status = 503, description = "Loading, or loading failed", body = Readiness),
    )
)]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let (status, error) = match state.model.status() {
        ModelStatus::Loading => (ReadyStatus::Loading, None),
        ModelStatus::Ready(_) => (ReadyStatus::Ready, None),
        ModelStatus::Failed(e) => (ReadyStatus::Failed, Some(e)),
    };
    let (queue_depth, running) = state.jobs.depth();
    let code = if status == ReadyStatus::Ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status,
        model: state.model_id.to_string(),
        error,
        queue_depth,
        running,
        workers: state.jobs.workers(),
        role: state.config.role.as_str().into(),
        instance: state.instance_id.to_string(),
    };
    (code, Json(body))
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "system",
    operation_id = "metrics",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let (queued, running) = state.jobs.depth();
    metrics::gauge!("sdserve_queue_depth").set(queued as f64);
    metrics::gauge!("sdserve_jobs_running").set(running as f64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::server::metrics::render(),
    )
        .into_response()
}

/// The OpenAPI document of this server (its limits, its security).
pub async fn openapi_json(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::server::openapi::document_json(&state.config),
    )
        .into_response()
}

pub async fn not_found(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path())).code("unknown_url")
}

pub async fn method_not_allowed(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorType::InvalidRequestError,
        format!("method {method} is not allowed on {}", uri.path()),
    )
    .code("method_not_allowed")
}
