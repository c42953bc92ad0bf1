//! Server configuration: command-line flags, each also readable from an `SDSERVE_*`
//! environment variable.

use std::path::PathBuf;

use crate::engine::device::DeviceArgs;
use crate::stores::StoreArgs;

pub const DEFAULT_HOST: &str = "127.0.0.1";
pub const DEFAULT_PORT: u16 = 8080;
pub const DEFAULT_ADAPTERS_DIR: &str = "adapters";
pub const DEFAULT_DATA_DIR: &str = "data";
pub const DEFAULT_REWARD_MODELS_DIR: &str = "models/rewards";

/// `sdserve serve`: the HTTP API over one model and a folder of LoRA adapters.
#[derive(clap::Parser, Debug, Clone)]
#[command(about = "Serve the HTTP API (OpenAI-compatible image generation, async jobs, adapters)")]
pub struct ServerConfig {
    /// Address to listen on.
    #[arg(long, env = "SDSERVE_HOST", default_value = DEFAULT_HOST)]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "SDSERVE_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// diffusers-layout model folder.
    #[arg(long, env = "SDSERVE_MODEL", default_value = crate::DEFAULT_MODEL_DIR)]
    pub model: PathBuf,
    /// Model id reported by /v1/models and in responses (default: the model folder's name).
    #[arg(long, env = "SDSERVE_MODEL_ID")]
    pub model_id: Option<String>,
    /// Folder of LoRA adapters (`<name>.safetensors` plus optional `<name>.json` sidecars), the
    /// adapter store unless `--adapter-store` names a bucket.
    #[arg(long, env = "SDSERVE_ADAPTERS_DIR", default_value = DEFAULT_ADAPTERS_DIR)]
    pub adapters_dir: PathBuf,
    /// Folder of the default SQLite database (job records, adapter registry) and of the
    /// adapter download cache.
    #[arg(long, env = "SDSERVE_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Require `Authorization: Bearer <key>` on every endpoint except /health, /ready,
    /// /metrics, /docs and /openapi.json.
    #[arg(long, env = "SDSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allowed CORS origins, comma-separated; `*` allows any. CORS is off when empty.
    #[arg(long, env = "SDSERVE_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    #[command(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    pub defaults: Defaults,
    /// Jobs that may wait in the queue (running jobs not counted); beyond it requests get 429.
    #[arg(long, env = "SDSERVE_QUEUE_CAPACITY", default_value_t = 32)]
    pub queue_capacity: usize,
    /// Generation worker threads (each runs one job at a time).
    #[arg(long, env = "SDSERVE_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Finished jobs kept in memory for GET /v1/images/jobs/{id}.
    #[arg(long, env = "SDSERVE_JOB_HISTORY", default_value_t = 256)]
    pub job_history: usize,
    /// Memory budget of the parsed-adapter cache, in MiB (pinned adapters always stay).
    #[arg(long, env = "SDSERVE_ADAPTER_CACHE_MB", default_value_t = 1024)]
    pub adapter_cache_mb: u64,
    /// Adapters loaded at start-up and never evicted from the cache (comma-separated names).
    #[arg(
        long = "pin-adapters",
        env = "SDSERVE_PIN_ADAPTERS",
        value_delimiter = ','
    )]
    pub pinned_adapters: Vec<String>,
    /// Largest adapter upload accepted by PUT /v1/adapters/{name}, in MiB.
    #[arg(long, env = "SDSERVE_MAX_UPLOAD_MB", default_value_t = 1024)]
    pub max_upload_mb: u64,
    /// /align training jobs run at once (each takes one thread; the rest wait in the queue).
    #[arg(long, env = "SDSERVE_ALIGN_WORKERS", default_value_t = 1)]
    pub align_workers: usize,
    /// Seconds a client may take to send a request's headers, and that an idle kept-alive
    /// connection stays open (then the connection closes).
    #[arg(long, env = "SDSERVE_HEADER_TIMEOUT_S", default_value_t = 30)]
    pub header_timeout_s: u64,
    /// Seconds a client may pause while sending a request body (then the request gets a 408).
    #[arg(long, env = "SDSERVE_BODY_TIMEOUT_S", default_value_t = 30)]
    pub body_timeout_s: u64,
    /// Folder with the weights of model-based rewards (`object_count/`, `aesthetic/`, ...).
    #[arg(long, env = "SDSERVE_REWARD_MODELS", default_value = DEFAULT_REWARD_MODELS_DIR)]
    pub reward_models: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// What this process does: `all` (serve and train, the default), `api` (serve; /align jobs
    /// wait in the shared queue for a trainer) or `trainer` (run /align jobs; only the probes
    /// and /metrics over HTTP).
    #[arg(long, env = "SDSERVE_ROLE", value_enum, default_value_t = Role::All)]
    pub role: Role,
    #[command(flatten)]
    pub stores: StoreArgs,
}

/// The part a process plays in a deployment.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    #[default]
    All,
    Api,
    Trainer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Api => "api",
            Role::Trainer => "trainer",
        }
    }

    /// Serves the image and adapter API (and accepts /align jobs).
    pub fn serves(self) -> bool {
        self != Role::Trainer
    }

    /// Runs /align jobs.
    pub fn trains(self) -> bool {
        self != Role::Api
    }
}

/// Request limits; a request beyond them gets a 400.
#[derive(clap::Args, Debug, Clone)]
pub struct Limits {
    /// Largest image width in pixels.
    #[arg(long, env = "SDSERVE_MAX_WIDTH", default_value_t = 1024)]
    pub max_width: u32,
    /// Largest image height in pixels.
    #[arg(long, env = "SDSERVE_MAX_HEIGHT", default_value_t = 1024)]
    pub max_height: u32,
    /// Largest width × height.
    #[arg(long, env = "SDSERVE_MAX_PIXELS", default_value_t = 1024 * 1024)]
    pub max_pixels: u64,
    /// Most denoising steps.
    #[arg(long, env = "SDSERVE_MAX_STEPS", default_value_t = 150)]
    pub max_steps: u32,
    /// Most images per request (`n`).
    #[arg(long, env = "SDSERVE_MAX_N", default_value_t = 10)]
    pub max_n: u32,
    /// Most prompt tokens (default: what the text encoder can see, its context length minus
    /// the start and end tokens).
    #[arg(long, env = "SDSERVE_MAX_PROMPT_TOKENS")]
    pub max_prompt_tokens: Option<usize>,
    /// Most adapters in one request.
    #[arg(long, env = "SDSERVE_MAX_LORAS", default_value_t = 8)]
    pub max_loras: usize,
    /// Largest body of an image edit (image, mask and fields, multipart), in MiB.
    #[arg(long, env = "SDSERVE_MAX_IMAGE_UPLOAD_MB", default_value_t = 25)]
    pub max_image_upload_mb: u64,
}

/// Values used when a request leaves a field out.
#[derive(clap::Args, Debug, Clone)]
pub struct Defaults {
    /// Default `size` as WxH (default: the UNet's sample size times the VAE scale).
    #[arg(long, env = "SDSERVE_DEFAULT_SIZE")]
    pub default_size: Option<String>,
    /// Default number of denoising steps.
    #[arg(long, env = "SDSERVE_DEFAULT_STEPS", default_value_t = 20)]
    pub default_steps: u32,
    /// Default classifier-free guidance scale.
    #[arg(long, env = "SDSERVE_DEFAULT_GUIDANCE_SCALE", default_value_t = 7.5)]
    pub default_guidance_scale: f64,
    /// Default scheduler: ddim, euler, euler_a, dpmpp_2m or dpmpp_2m_karras.
    #[arg(long, env = "SDSERVE_DEFAULT_SCHEDULER", default_value = "ddim")]
    pub default_scheduler: String,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_width: 1024,
            max_height: 1024,
            max_pixels: 1024 * 1024,
            max_steps: 150,
            max_n: 10,
            max_prompt_tokens: None,
            max_loras: 8,
            max_image_upload_mb: 25,
        }
    }
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            default_size: None,
            default_steps: 20,
            default_guidance_scale: 7.5,
            default_scheduler: "ddim".into(),
        }
    }
}

impl Default for ServerConfig {
    /// The flag defaults, without reading any environment variable.
    fn default() -> Self {
        Self {
            host: DEFAULT_HOST.into(),
            port: DEFAULT_PORT,
            model: PathBuf::from(crate::DEFAULT_MODEL_DIR),
            model_id: None,
            adapters_dir: DEFAULT_ADAPTERS_DIR.into(),
            data_dir: DEFAULT_DATA_DIR.into(),
            api_key: None,
            cors_origins: Vec::new(),
            limits: Limits::default(),
            defaults: Defaults::default(),
            queue_capacity: 32,
            workers: 1,
            job_history: 256,
            adapter_cache_mb: 1024,
            pinned_adapters: Vec::new(),
            max_upload_mb: 1024,
            align_workers: 1,
            header_timeout_s: 30,
            body_timeout_s: 30,
            reward_models: DEFAULT_REWARD_MODELS_DIR.into(),
            device: DeviceArgs {
                cuda: false,
                dtype: "f32".into(),
                vae_tiling: false,
            },
            role: Role::All,
            stores: StoreArgs::default(),
        }
    }
}

impl ServerConfig {
    /// The defaults for `model`, listening on a free loopback port (for tests and embedding).
    pub fn for_model(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            port: 0,
            ..Self::default()
        }
    }

    /// The id this server reports for its model.
    pub fn model_id(&self) -> String {
        if let Some(id) = &self.model_id {
            return id.clone();
        }
        let canonical = self
            .model
            .canonicalize()
            .unwrap_or_else(|_| self.model.clone());
        canonical
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .unwrap_or("sdserve")
            .to_string()
    }

    /// Checks values that clap cannot, before anything starts.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.workers >= 1, "--workers must be at least 1");
        anyhow::ensure!(self.align_workers >= 1, "--align-workers must be at least 1");
        anyhow::ensure!(self.limits.max_n >= 1, "--max-n must be at least 1");
        anyhow::ensure!(self.limits.max_steps >= 1, "--max-steps must be at least 1");
        anyhow::ensure!(self.header_timeout_s >= 1, "--header-timeout-s must be at least 1");
        anyhow::ensure!(self.body_timeout_s >= 1, "--body-timeout-s must be at least 1");
        if let Some(size) = &self.defaults.default_size {
            crate::server::api::parse_size(size).ok_or_else(|| {
                anyhow::anyhow!("--default-size must look like 512x512, got {size:?}")
            })?;
        }
        self.defaults
            .default_scheduler
            .parse::<crate::engine::scheduler::SchedulerKind>()
            .map_err(|e| anyhow::anyhow!("--default-scheduler: {e}"))?;
        self.stores.validate()?;
        if let Some(key) = &self.api_key {
            anyhow::ensure!(!key.is_empty(), "--api-key must not be empty");
        }
        Ok(())
    }
}
