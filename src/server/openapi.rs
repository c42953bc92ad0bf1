//! The OpenAPI document, generated from the handlers and types, then fitted to a server's
//! configuration: the limits it enforces, and security optional without an API key. With
//! the defaults it is committed as `openapi/openapi.json` (`sdserve openapi` prints it).

use serde_json::{json, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::config::ServerConfig;

use super::api;
use super::error;
use super::routes::{adapters, align, edits, images, jobs, system};
use crate::align::{jobs as align_jobs, request as align_request, trainer, validation};
use crate::rewards::registry::RewardSpec;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sdserve",
        description = "Stable Diffusion server with per-request LoRA adapters. `POST /v1/images/generations` \
and `POST /v1/images/edits` follow OpenAI's Images API (b64_json only) with Stable Diffusion extensions; \
the job API runs the same requests asynchronously with progress and cancellation. Every error has the body \
`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`.",
        license(name = "MIT OR Apache-2.0")
    ),
    paths(
        images::create_image,
        edits::create_image_edit,
        jobs::create_job,
        jobs::get_job,
        jobs::cancel_job,
        jobs::job_events,
        adapters::list_adapters,
        adapters::get_adapter,
        adapters::put_adapter,
        adapters::delete_adapter,
        adapters::reload_adapters,
        align::create_align_job,
        align::list_align_jobs,
        align::get_align_job,
        align::cancel_align_job,
        align::align_job_events,
        align::list_rewards,
        system::list_models,
        system::get_model,
        system::health,
        system::ready,
        system::metrics,
    ),
    components(schemas(
        error::ErrorResponse,
        error::ErrorObject,
        error::ErrorType,
        api::ImageGenerationRequest,
        api::ImageEditForm,
        api::EditParameters,
        api::EditMode,
        api::LoraRequest,
        api::ResponseFormat,
        api::ImageFormat,
        api::SchedulerName,
        api::ImagesResponse,
        api::ImageData,
        api::GenerationParameters,
        api::AppliedLora,
        api::ImageJob,
        api::ImageJobStreamEvent,
        api::JobStatus,
        api::JobProgress,
        api::JobError,
        api::AdapterInfo,
        api::AdapterSource,
        api::AdapterList,
        api::AdapterDeleted,
        api::AdapterReload,
        api::ModelList,
        api::ModelInfo,
        api::ModelFamily,
        api::Health,
        api::Readiness,
        api::ReadyStatus,
        align_request::AlignRequest,
        align_request::TruncationRequest,
        RewardSpec,
        align_jobs::AlignJob,
        align_jobs::AlignStatus,
        align_jobs::AlignError,
        align_jobs::AlignEvent,
        trainer::StepReport,
        validation::Validation,
        align::AlignJobList,
        align::AlignEventList,
        align::AlignJobStreamEvent,
        align::RewardList,
        align::RewardDescription,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "images", description = "OpenAI-compatible image generation and edits (image-to-image, inpainting)"),
        (name = "jobs", description = "Asynchronous image jobs: submit, poll, cancel, events"),
        (name = "adapters", description = "LoRA adapters: list, upload, delete, rescan"),
        (name = "align", description = "AlignProp runs: reward fine-tuning of LoRA adapters as background jobs"),
        (name = "models", description = "The served model"),
        (name = "system", description = "Probes and metrics (no API key needed)"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The server's --api-key; only enforced when one is configured",
                    ))
                    .build(),
            ),
        );
    }
}

/// Request fields whose bounds come from the server's limits: (schema, property, JSON
/// Schema keyword, limit).
fn limit_fields(config: &ServerConfig) -> [(&'static str, &'static str, &'static str, Value); 5] {
    let l = &config.limits;
    [
        ("ImageGenerationRequest", "n", "maximum", json!(l.max_n)),
        ("ImageGenerationRequest", "steps", "maximum", json!(l.max_steps)),
        ("ImageGenerationRequest", "loras", "maxItems", json!(l.max_loras)),
        ("ImageEditForm", "n", "maximum", json!(l.max_n)),
        ("ImageEditForm", "steps", "maximum", json!(l.max_steps)),
    ]
}

/// The document for a server run with `config`.
pub fn document(config: &ServerConfig) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serialises");
    for (schema, property, keyword, limit) in limit_fields(config) {
        doc["components"]["schemas"][schema]["properties"][property][keyword] = limit;
    }
    // `POST /align` is `POST /v1/align/jobs` under a short name
    let mut short = doc["paths"]["/v1/align/jobs"]["post"].clone();
    short["operationId"] = json!("create_align_job_short");
    doc["paths"]["/align"] = json!({ "post": short });
    if config.api_key.is_none() {
        // no key configured: every operation may be called without credentials
        let paths = doc["paths"].as_object_mut().expect("paths");
        for op in paths.values_mut().filter_map(Value::as_object_mut).flat_map(|p| p.values_mut()) {
            if let Some(Value::Array(security)) = op.get_mut("security") {
                security.insert(0, json!({}));
            }
        }
    }
    doc
}

/// [`document`] as pretty JSON with a final newline.
pub fn document_json(config: &ServerConfig) -> String {
    let mut s = serde_json::to_string_pretty(&document(config)).expect("the OpenAPI document serialises");
    s.push('\n');
    s
}

/// The document of a server with the default configuration, exactly as committed in
/// `openapi/openapi.json`.
pub fn spec_json() -> String {
    document_json(&ServerConfig::default())
}
