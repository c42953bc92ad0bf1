//! Adapter management: list, inspect, upload (validated, atomic), delete, rescan.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use crate::server::api::{AdapterDeleted, AdapterInfo, AdapterList, AdapterReload, UploadQuery};
use crate::server::error::{ApiError, ErrorResponse};
use crate::server::extract::{ApiPath, ApiQuery};
use crate::server::state::AppState;

/// List adapters.
///
/// Rescans the adapters folder first, so files dropped in appear without a reload.
#[utoipa::path(
    get,
    path = "/v1/adapters",
    tag = "adapters",
    operation_id = "list_adapters",
    responses(
        (status = 200, description = "Every adapter of the folder", body = AdapterList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn list_adapters(State(state): State<AppState>) -> Result<Json<AdapterList>, ApiError> {
    let registry = state.adapters.clone();
    let data = tokio::task::spawn_blocking(move || registry.list()).await?;
    Ok(Json(AdapterList {
        object: "list".into(),
        data,
    }))
}

/// Get one adapter.
#[utoipa::path(
    get,
    path = "/v1/adapters/{name}",
    tag = "adapters",
    operation_id = "get_adapter",
    params(("name" = String, Path, description = "Adapter name")),
    responses(
        (status = 200, description = "The adapter", body = AdapterInfo),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "No such adapter", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn get_adapter(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<AdapterInfo>, ApiError> {
    let registry = state.adapters.clone();
    Ok(Json(
        tokio::task::spawn_blocking(move || registry.info(&name)).await??,
    ))
}

/// Upload an adapter.
///
/// The body is the raw `.safetensors` file (diffusers/PEFT or kohya keys). It is parsed and
/// checked against the served model before anything is written; the file is then written
/// atomically as `<name>.safetensors` and is usable at once. Names match
/// `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`. An existing name gives 409 unless `overwrite=true`;
/// jobs already holding the old version keep it.
#[utoipa::path(
    put,
    path = "/v1/adapters/{name}",
    tag = "adapters",
    operation_id = "upload_adapter",
    params(("name" = String, Path, description = "Adapter name"), UploadQuery),
    request_body(content = inline(crate::server::api::SafetensorsFile), content_type = "application/octet-stream", description = "A safetensors LoRA file"),
    responses(
        (status = 201, description = "Created", body = AdapterInfo),
        (status = 200, description = "Replaced (overwrite=true)", body = AdapterInfo),
        (status = 400, description = "Invalid name, or not a LoRA adapter for this model", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 409, description = "An adapter of that name exists and overwrite is not set", body = ErrorResponse),
        (status = 413, description = "Larger than --max-upload-mb", body = ErrorResponse),
        (status = 503, description = "The model is still loading", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn put_adapter(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(StatusCode, Json<AdapterInfo>), ApiError> {
    if !crate::server::adapters::valid_name(&name) || name == "reload" {
        return Err(crate::server::adapters::AdapterError::InvalidName(name).into());
    }
    let body = body?;
    if body.is_empty() {
        return Err(
            ApiError::bad_request("the request body is empty; send the .safetensors file")
                .code("invalid_adapter"),
        );
    }
    state.ready_model()?;
    let registry = state.adapters.clone();
    let (info, created) =
        tokio::task::spawn_blocking(move || registry.install(&name, &body, None, query.overwrite))
            .await??;
    Ok((
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(info),
    ))
}

/// Delete an adapter (file and sidecar); running jobs that use it are not affected.
#[utoipa::path(
    delete,
    path = "/v1/adapters/{name}",
    tag = "adapters",
    operation_id = "delete_adapter",
    params(("name" = String, Path, description = "Adapter name")),
    responses(
        (status = 200, description = "Deleted", body = AdapterDeleted),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "No such adapter", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn delete_adapter(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<AdapterDeleted>, ApiError> {
    let registry = state.adapters.clone();
    let id = name.clone();
    tokio::task::spawn_blocking(move || registry.delete(&name)).await??;
    Ok(Json(AdapterDeleted {
        id,
        object: "adapter".into(),
        deleted: true,
    }))
}

/// Rescan the adapters folder.
///
/// Picks up added, removed and changed files (changed ones are re-parsed on next use).
/// Listing and requests rescan on their own; this is for scripts that want a report.
#[utoipa::path(
    post,
    path = "/v1/adapters/reload",
    tag = "adapters",
    operation_id = "reload_adapters",
    responses(
        (status = 200, description = "What changed", body = AdapterReload),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn reload_adapters(
    State(state): State<AppState>,
) -> Result<Json<AdapterReload>, ApiError> {
    let registry = state.adapters.clone();
    Ok(Json(
        tokio::task::spawn_blocking(move || registry.rescan()).await?,
    ))
}
