//! Adapter management: list, inspect, upload (streamed to a file, validated, atomic), delete,
//! rescan. Every change is seen by every replica within its poll interval.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use crate::server::adapters::AdapterError;
use crate::server::api::{AdapterDeleted, AdapterInfo, AdapterList, AdapterReload, UploadQuery};
use crate::server::error::{is_body_timeout, ApiError, ErrorResponse};
use crate::server::extract::{ApiPath, ApiQuery};
use crate::server::state::AppState;
use crate::stores::blobs::StageError;

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
    let data = state.adapters.list().await?;
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
    Ok(Json(state.adapters.info(&name).await?))
}

/// Upload an adapter.
///
/// The body is the raw `.safetensors` file (diffusers/PEFT or kohya keys), streamed to a
/// temporary file (memory use does not grow with its size). It is parsed and checked against
/// the served model before anything is stored; it is then stored atomically and is usable at
/// once, on every replica within its poll interval. Names match
/// `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`, except `reload` (a route). An existing name gives 409
/// unless `overwrite=true`; jobs already holding the old version keep it.
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
        (status = 400, description = "Invalid or reserved name, or not a LoRA adapter for this model", body = ErrorResponse),
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
    body: Body,
) -> Result<(StatusCode, Json<AdapterInfo>), ApiError> {
    let limit = state.config.max_upload_mb.saturating_mul(1024 * 1024);
    let refusal = if !crate::stores::registry::valid_name(&name) {
        Some(AdapterError::InvalidName(name.clone()).into())
    } else {
        state.ready_model().err()
    };
    if let Some(error) = refusal {
        // Read (and drop) the body first: a client still sending would otherwise see the
        // connection close instead of the error.
        drain(body, limit).await;
        return Err(error);
    }
    let staged = state.adapters.blobs().stage(body.into_data_stream(), limit).await.map_err(|e| match e {
        StageError::TooLarge => ApiError::payload_too_large(format!("the adapter is larger than {} MiB (--max-upload-mb)", state.config.max_upload_mb)),
        StageError::Body(e) if is_body_timeout(&*e) => ApiError::body_timeout(),
        StageError::Body(e) => ApiError::bad_request(format!("cannot read request body: {e}")).code("invalid_body"),
        StageError::Io(m) => ApiError::internal(m),
    })?;
    if staged.size == 0 {
        return Err(ApiError::bad_request("the request body is empty; send the .safetensors file").code("invalid_adapter"));
    }
    let (info, created) = state.adapters.install(&name, staged, None, query.overwrite, None).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(info)))
}

/// Reads a request body to its end (at most `limit` bytes), keeping nothing.
async fn drain(body: Body, limit: u64) {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut seen = 0u64;
    while let Some(Ok(chunk)) = stream.next().await {
        seen += chunk.len() as u64;
        if seen > limit {
            break;
        }
    }
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
    let id = name.clone();
    state.adapters.delete(&name).await?;
    Ok(Json(AdapterDeleted {
        id,
        object: "adapter".into(),
        deleted: true,
    }))
}

/// Rescan the adapter store.
///
/// Registers adapters put into the store by hand (`<name>.safetensors` in the adapters folder,
/// or at the top of the bucket) and forgets removed ones; changed files are re-parsed on next
/// use. Listing (and, for a folder, requests) rescan on their own; this is for scripts that
/// want a report.
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
    Ok(Json(state.adapters.rescan().await?))
}
