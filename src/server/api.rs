//! Request and response bodies of the HTTP API (the wire types; also the OpenAPI schemas).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::engine::image::OutputFormat;
pub use crate::engine::pipeline::ModelFamily;
use crate::engine::scheduler::SchedulerKind;

// ---------------------------------------------------------------------------------------------
// Image generation

/// `POST /v1/images/generations` and `POST /v1/images/jobs`: OpenAI's image request plus
/// Stable Diffusion extensions. Unknown fields are ignored.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[schema(example = json!({
    "prompt": "two red circles and a blue square",
    "size": "64x64",
    "n": 1,
    "steps": 10,
    "guidance_scale": 7.5,
    "seed": 42,
    "loras": [{"name": "probe_diffusers", "weight": 0.8}]
}))]
pub struct ImageGenerationRequest {
    /// Text prompt (limited to what the text encoder sees, see `--max-prompt-tokens`).
    pub prompt: String,
    /// Accepted for OpenAI compatibility; this server serves one model (see `GET /v1/models`).
    #[serde(default)]
    pub model: Option<String>,
    /// Number of images, 1..=`--max-n` (default 1). Image `i` uses seed `seed + i`.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10)]
    pub n: Option<u32>,
    /// `WIDTHxHEIGHT` in pixels, multiples of the VAE scale (8 for SD 1.x/2.x); `auto` or
    /// absent means the server default.
    #[serde(default)]
    #[schema(example = "512x512")]
    pub size: Option<String>,
    /// Only `b64_json`.
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// Image file format (default `png`).
    #[serde(default)]
    pub output_format: Option<ImageFormat>,
    /// 0..=100; the JPEG quality (PNG and WebP here are lossless and ignore it). Default 100.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u32>,
    /// OpenAI field, accepted and ignored.
    #[serde(default)]
    pub quality: Option<String>,
    /// OpenAI field, accepted and ignored.
    #[serde(default)]
    pub style: Option<String>,
    /// OpenAI field, accepted and ignored.
    #[serde(default)]
    pub user: Option<String>,
    /// OpenAI field, accepted and ignored.
    #[serde(default)]
    pub background: Option<String>,
    /// OpenAI field, accepted and ignored.
    #[serde(default)]
    pub moderation: Option<String>,
    /// Streaming partial images is not supported: `true` gets a 400 (use the job API's
    /// server-sent events for progress).
    #[serde(default)]
    pub stream: Option<bool>,
    /// Extension: what the image should not show. Left out, guidance uses the empty prompt, or
    /// zero embeddings on SDXL models (diffusers' `force_zeros_for_empty_prompt`).
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Extension: denoising steps, 1..=`--max-steps` (default `--default-steps`).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub steps: Option<u32>,
    /// Extension: classifier-free guidance scale, 0..=30 (≤ 1 disables guidance).
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 30.0)]
    pub guidance_scale: Option<f64>,
    /// Extension: seed of the first image; absent or -1 draws one at random. The seeds used
    /// are returned. Values up to 2^64-1 are accepted; random seeds stay below 2^53.
    #[serde(default, deserialize_with = "de_seed")]
    #[schema(value_type = Option<i64>, minimum = -1)]
    pub seed: Option<u64>,
    /// Extension: sampler (default `--default-scheduler`).
    #[serde(default)]
    pub scheduler: Option<SchedulerName>,
    /// Extension: DDIM eta in 0..=1 (0 = deterministic; other schedulers ignore it).
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub eta: Option<f64>,
    /// Extension: LoRA adapters for this request only, applied together (see `GET /v1/adapters`).
    #[serde(default)]
    pub loras: Option<Vec<LoraRequest>>,
}

/// Seeds arrive as JSON integers: -1 (random) or 0..=2^64-1.
fn de_seed<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v: Option<serde_json::Number> = Option::deserialize(d)?;
    match v {
        None => Ok(None),
        Some(n) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u))
            } else if n.as_i64() == Some(-1) {
                Ok(None)
            } else {
                Err(serde::de::Error::custom(format!(
                    "seed must be -1 or an integer in 0..=18446744073709551615, got {n}"
                )))
            }
        }
    }
}

/// One adapter of a request.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct LoraRequest {
    /// Adapter name, as listed by `GET /v1/adapters`.
    pub name: String,
    /// Strength multiplier (default 1; negative values subtract the adapter), -10..=10.
    #[serde(default = "one")]
    #[schema(default = 1.0, minimum = -10.0, maximum = 10.0)]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// How images are returned. `url` is understood only to be refused with a clear 400, so the
/// document lists `b64_json` alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    B64Json,
    Url,
}

impl utoipa::PartialSchema for ResponseFormat {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["b64_json"]))
            .description(Some("How images are returned: base64 in the response (`url` is refused with a 400)"))
            .build()
            .into()
    }
}

impl ToSchema for ResponseFormat {}

/// Image file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    #[default]
    Png,
    #[serde(alias = "jpg")]
    Jpeg,
    Webp,
}

impl From<ImageFormat> for OutputFormat {
    fn from(f: ImageFormat) -> Self {
        match f {
            ImageFormat::Png => OutputFormat::Png,
            ImageFormat::Jpeg => OutputFormat::Jpeg,
            ImageFormat::Webp => OutputFormat::Webp,
        }
    }
}

/// Sampler: DDIM, Euler (SDXL's default), Euler ancestral, DPM++ 2M (with Karras sigmas).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerName {
    Ddim,
    Euler,
    EulerA,
    #[serde(rename = "dpmpp_2m")]
    Dpmpp2m,
    #[serde(rename = "dpmpp_2m_karras")]
    Dpmpp2mKarras,
}

impl SchedulerName {
    pub fn as_str(self) -> &'static str {
        match self {
            SchedulerName::Ddim => "ddim",
            SchedulerName::Euler => "euler",
            SchedulerName::EulerA => "euler_a",
            SchedulerName::Dpmpp2m => "dpmpp_2m",
            SchedulerName::Dpmpp2mKarras => "dpmpp_2m_karras",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Ddim, Self::Euler, Self::EulerA, Self::Dpmpp2m, Self::Dpmpp2mKarras]
            .into_iter()
            .find(|k| k.as_str() == s)
    }

    pub fn kind(self) -> anyhow::Result<SchedulerKind> {
        self.as_str()
            .parse::<SchedulerKind>()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// Parses `WxH` (also `W×H`).
pub fn parse_size(s: &str) -> Option<(u32, u32)> {
    let s = s.trim();
    let (w, h) = s.split_once(['x', 'X', '×'])?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}

/// The effective parameters of a generation: everything needed to reproduce it.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct GenerationParameters {
    /// Model id.
    pub model: String,
    pub prompt: String,
    /// `null` when the request gave none.
    pub negative_prompt: Option<String>,
    pub n: u32,
    /// `WxH`.
    pub size: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub scheduler: SchedulerName,
    pub eta: f64,
    /// Seed of the first image.
    pub seed: u64,
    /// Seed of every image (`seed + i`).
    pub seeds: Vec<u64>,
    /// Adapters applied, with the content hash of the version used.
    pub loras: Vec<AppliedLora>,
    pub output_format: ImageFormat,
    pub output_compression: u32,
    /// Edits only: what was done with the input image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit: Option<EditParameters>,
}

/// The effective parameters of an edit (`POST /v1/images/edits`).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct EditParameters {
    pub mode: EditMode,
    /// The share of the schedule redone, in (0, 1]: the last `⌊steps × strength⌋` steps run.
    pub strength: f64,
    /// SHA-256 of the uploaded image file.
    pub image_sha256: String,
    /// SHA-256 of the uploaded mask file (inpainting).
    #[schema(required = true)]
    pub mask_sha256: Option<String>,
}

/// How an edit uses its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EditMode {
    /// No mask: the whole image is noised and denoised (diffusers' `StableDiffusionImg2ImgPipeline`).
    ImageToImage,
    /// With a mask: only the masked region is repainted (diffusers' `StableDiffusionInpaintPipeline`).
    Inpaint,
}

/// `POST /v1/images/edits` (and `POST /v1/images/jobs` as `multipart/form-data`): OpenAI's
/// image edit form, as the OpenAI SDKs send it, plus the generation extensions. Text fields
/// carry numbers as text; unknown fields are ignored. (The form's schema; it is parsed by
/// `server::edit_form`.)
#[derive(ToSchema)]
pub struct ImageEditForm {
    /// The image to edit (PNG, JPEG or WebP, at most 4096 pixels a side). Also accepted as
    /// `image[]`, with one file. An alpha channel is ignored.
    #[schema(value_type = String, format = Binary)]
    pub image: Vec<u8>,
    /// Inpainting mask: where it is white (luma ≥ 0.5) the image is repainted, where black it
    /// is kept; a mask with transparent pixels instead repaints where it is more than half
    /// transparent (OpenAI's convention). Resized to the output size. Without a mask the
    /// whole image is edited (image-to-image).
    #[schema(value_type = Option<String>, format = Binary)]
    pub mask: Option<Vec<u8>>,
    /// Text prompt.
    pub prompt: String,
    /// Accepted for OpenAI compatibility.
    pub model: Option<String>,
    /// Number of images, 1..=`--max-n` (default 1). Image `i` uses seed `seed + i`.
    #[schema(minimum = 1)]
    pub n: Option<u32>,
    /// Output `WIDTHxHEIGHT`; the image (and mask) are resized to it. Absent or `auto`: the
    /// image's size, rounded down to a multiple of the VAE scale.
    pub size: Option<String>,
    /// Only `b64_json`.
    pub response_format: Option<ResponseFormat>,
    pub output_format: Option<ImageFormat>,
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u32>,
    /// Extension: the share of the schedule redone, in (0, 1]. Default as diffusers: 0.8
    /// without a mask, 1 with one (SDXL: 0.3 and 0.9999). At least one step must run:
    /// `⌊steps × strength⌋ ≥ 1`.
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub strength: Option<f64>,
    /// Extension, as in `POST /v1/images/generations`.
    pub negative_prompt: Option<String>,
    /// Extension: denoising steps of the full schedule, 1..=`--max-steps`.
    #[schema(minimum = 1)]
    pub steps: Option<u32>,
    /// Extension: classifier-free guidance scale, 0..=30.
    #[schema(minimum = 0.0, maximum = 30.0)]
    pub guidance_scale: Option<f64>,
    /// Extension: seed of the first image; -1 or absent draws one.
    #[schema(minimum = -1)]
    pub seed: Option<i64>,
    pub scheduler: Option<SchedulerName>,
    /// Extension: DDIM eta in 0..=1.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub eta: Option<f64>,
    /// Extension: adapters as a JSON array, e.g. `[{"name": "style", "weight": 0.8}]`. The
    /// OpenAI SDKs' `extra_body` form (`loras[][name]`, `loras[][weight]`) is read too when
    /// every adapter gives both.
    pub loras: Option<String>,
}

/// An adapter as applied to a request.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct AppliedLora {
    pub name: String,
    pub weight: f64,
    /// SHA-256 of the adapter file that was used.
    pub sha256: String,
}

/// The OpenAI images response, plus the seed of each image and the effective parameters.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: u64,
    pub data: Vec<ImageData>,
    pub output_format: ImageFormat,
    /// `WxH`.
    pub size: String,
    pub parameters: GenerationParameters,
}

/// One image.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ImageData {
    /// The image file, base64-encoded.
    pub b64_json: String,
    /// Seed that produced this image.
    pub seed: u64,
}

// ---------------------------------------------------------------------------------------------
// Jobs

/// Job lifecycle: `queued` → `running` → one of the terminal `succeeded`, `failed`,
/// `cancelled` (a queued job may go straight to `cancelled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Queued, Self::Running, Self::Succeeded, Self::Failed, Self::Cancelled].into_iter().find(|v| v.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }
}

/// Denoising progress over all images of a job.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct JobProgress {
    /// Steps done, over all images.
    pub step: u32,
    /// `steps × n`.
    pub total_steps: u32,
    /// `step / total_steps`, 0..=1.
    pub fraction: f64,
    /// Images finished.
    pub images_done: u32,
}

impl JobProgress {
    pub fn new(step: u32, total_steps: u32, images_done: u32) -> Self {
        let fraction = if total_steps == 0 { 0.0 } else { step as f64 / total_steps as f64 };
        Self { step, total_steps, fraction, images_done }
    }
}

/// Why a job failed or was cancelled.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct JobError {
    /// `cancelled`, `generation_failed` or `internal_error`.
    pub code: String,
    pub message: String,
}

/// An image generation job.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ImageJob {
    pub id: String,
    /// Always `image.job`.
    pub object: String,
    pub status: JobStatus,
    /// Unix seconds.
    pub created: u64,
    #[schema(required = true)]
    pub started_at: Option<u64>,
    #[schema(required = true)]
    pub finished_at: Option<u64>,
    /// 1 = next to start; null unless queued.
    #[schema(required = true)]
    pub queue_position: Option<u32>,
    /// A cancel was requested while running; the job stops at its next step.
    pub cancel_requested: bool,
    pub progress: JobProgress,
    /// The effective parameters (seeds included, known from submission).
    pub parameters: GenerationParameters,
    /// The images, once `succeeded`.
    #[schema(required = true)]
    pub result: Option<ImagesResponse>,
    /// Set when `failed` or `cancelled`.
    #[schema(required = true)]
    pub error: Option<JobError>,
    /// `GET` this for the job's state.
    pub poll_url: String,
    /// Server-sent events with the job's progress.
    pub events_url: String,
    /// `POST` here to cancel.
    pub cancel_url: String,
}

/// One server-sent event of `GET /v1/images/jobs/{id}/events`: the `text/event-stream` body
/// is a sequence of these, each as `event:`, `id:` and `data:` lines.
#[derive(ToSchema)]
pub struct ImageJobStreamEvent {
    /// `queued`, `progress` (running: one per step, coalesced when the client is slow), then
    /// one of `succeeded`, `failed` or `cancelled`, after which the stream ends.
    pub event: String,
    /// Increases with every change of the job.
    pub id: String,
    /// The job as `GET /v1/images/jobs/{id}` returns it (`result` set once succeeded), as JSON.
    pub data: ImageJob,
}

// ---------------------------------------------------------------------------------------------
// Adapters

pub use crate::stores::AdapterSource;

/// An adapter of the adapters folder.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct AdapterInfo {
    pub name: String,
    /// Always `adapter`.
    pub object: String,
    /// Key layout of the file (e.g. `diffusers`, `kohya`); null until parsed.
    #[schema(required = true)]
    pub format: Option<String>,
    /// LoRA rank (the largest, when modules differ); null until parsed.
    #[schema(required = true)]
    pub rank: Option<u32>,
    /// LoRA alpha, when the file stores one.
    #[schema(required = true)]
    pub alpha: Option<f64>,
    /// Modules the adapter changes (empty until parsed).
    pub target_modules: Vec<String>,
    /// Number of LoRA parameters; null until parsed.
    #[schema(required = true)]
    pub num_params: Option<u64>,
    /// File size in bytes.
    pub size_bytes: u64,
    /// SHA-256 of the file.
    #[schema(required = true)]
    pub sha256: Option<String>,
    pub source: AdapterSource,
    /// The /align job that made it.
    #[schema(required = true)]
    pub job_id: Option<String>,
    /// Base model it was trained for, when known.
    #[schema(required = true)]
    pub base_model: Option<String>,
    /// Unix seconds (sidecar `created`, else the file's modification time).
    pub created: u64,
    /// Parsed and held in the adapter cache.
    pub loaded: bool,
    /// Never evicted from the cache.
    pub pinned: bool,
    /// Why the file cannot be used, if it cannot.
    #[schema(required = true)]
    pub error: Option<String>,
}

/// `GET /v1/adapters`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct AdapterList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<AdapterInfo>,
}

/// `DELETE /v1/adapters/{name}`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct AdapterDeleted {
    pub id: String,
    /// Always `adapter`.
    pub object: String,
    pub deleted: bool,
}

/// `POST /v1/adapters/reload`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct AdapterReload {
    /// Adapters found.
    pub count: usize,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Files that changed on disk since the last scan (their cached copy was dropped).
    pub changed: Vec<String>,
}

/// Query of `PUT /v1/adapters/{name}`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// Replace an existing adapter of that name (otherwise 409).
    #[serde(default)]
    pub overwrite: bool,
}

// ---------------------------------------------------------------------------------------------
// Models and health

/// `GET /v1/models`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<ModelInfo>,
}

/// A served model.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ModelInfo {
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix seconds (server start).
    pub created: u64,
    pub owned_by: String,
    /// Loaded and accepting requests.
    pub ready: bool,
    /// `sd1`, `sd2` or `sdxl`, once loaded (`null` while loading or after a failed load).
    pub family: Option<ModelFamily>,
}

/// `GET /health`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// Model state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReadyStatus {
    Loading,
    Ready,
    Failed,
}

/// `GET /ready`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Readiness {
    pub status: ReadyStatus,
    pub model: String,
    /// Why loading failed.
    #[schema(required = true)]
    pub error: Option<String>,
    /// Jobs waiting.
    pub queue_depth: usize,
    /// Jobs running.
    pub running: usize,
    pub workers: usize,
    /// `all`, `api` or `trainer`.
    pub role: String,
    /// This process's id in the deployment.
    pub instance: String,
}

/// A `.safetensors` file sent as the raw request body (schema: a binary string).
pub struct SafetensorsFile;

impl utoipa::PartialSchema for SafetensorsFile {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .content_media_type("application/octet-stream")
            .description(Some(
                "A LoRA adapter in safetensors format (diffusers/PEFT or kohya keys)",
            ))
            .build()
            .into()
    }
}

impl utoipa::ToSchema for SafetensorsFile {}
