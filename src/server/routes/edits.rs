//! `POST /v1/images/edits` (OpenAI-compatible image edits: image-to-image and inpainting) and
//! the submission path the job API shares.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use super::images::{enqueue, respond, QueueRefusals};
use crate::server::api::{ImageEditForm, ImagesResponse};
use crate::server::edit_form::EditForm;
use crate::server::edit_params;
use crate::server::error::{ApiError, ErrorResponse};
use crate::server::jobs::Job;
use crate::server::state::AppState;

/// Validates an edit (decoding its images off the runtime), resolves its adapters and
/// queues it.
pub async fn submit_edit(state: &AppState, form: EditForm, retained: bool) -> Result<Arc<Job>, ApiError> {
    let model = state.ready_model()?;
    let (config, model_id) = (state.config.clone(), state.model_id.clone());
    let validated = tokio::task::spawn_blocking(move || edit_params::validate(&config, &model_id, &model, form)).await??;
    enqueue(state, validated, retained).await
}

/// Edit an image (OpenAI `images.edit`).
///
/// `multipart/form-data` as the OpenAI SDKs send it. Without a `mask` the whole image is
/// noised to `strength` and denoised towards the prompt (diffusers'
/// `StableDiffusionImg2ImgPipeline`); with one, only the masked region is repainted
/// (`StableDiffusionInpaintPipeline` with a 4-channel UNet: the kept region is re-noised and put
/// back after every step). Only `b64_json` output. Runs through the same queue as generations;
/// if the client disconnects, the job is cancelled.
#[utoipa::path(
    post,
    path = "/v1/images/edits",
    tag = "images",
    operation_id = "create_image_edit",
    request_body(content = ImageEditForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The images, their seeds and the effective parameters", body = ImagesResponse),
        (status = 400, description = "A malformed form, an unreadable image or a value out of range", body = ErrorResponse),
        (status = 413, description = "The form is larger than `--max-image-upload-mb`", body = ErrorResponse),
        (status = 500, description = "Generation failed", body = ErrorResponse),
        QueueRefusals,
    ),
    security(("bearer" = []))
)]
pub async fn create_image_edit(State(state): State<AppState>, form: EditForm) -> Result<Json<ImagesResponse>, ApiError> {
    let job = submit_edit(&state, form, false).await?;
    respond(&state, job).await
}
