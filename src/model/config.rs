//! diffusers / transformers `config.json` files, with the same field names and defaults.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Reads and parses a JSON config file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

/// A value given either once for all blocks or per block (`attention_head_dim: 8` or `[5, 10, 20, 20]`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Many(Vec<usize>),
}

impl PerBlock {
    /// The value for each of `n` blocks.
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Many(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Many(v) => bail!("{field} has {} entries, expected {n}", v.len()),
        }
    }
}

fn one() -> PerBlock {
    PerBlock::One(1)
}
fn default_true() -> bool {
    true
}
fn default_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "silu".into()
}
fn default_one_f64() -> f64 {
    1.0
}
fn default_three() -> usize {
    3
}
fn default_scaling() -> f64 {
    0.18215
}

/// `unet/config.json` of a `UNet2DConditionModel`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct UNetConfig {
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    #[serde(default = "default_four")]
    pub in_channels: usize,
    #[serde(default = "default_four")]
    pub out_channels: usize,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub only_cross_attention: OnlyCross,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers")]
    pub layers_per_block: PerBlock,
    #[serde(default = "default_one_usize")]
    pub downsample_padding: usize,
    #[serde(default = "default_one_f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "default_act")]
    pub act_fn: String,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    #[serde(default = "one")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of the sinusoidal features of each SDXL time id (`addition_embed_type: "text_time"`).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of `add_embedding`: the pooled text embedding plus six time-id features.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "default_time_type")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "default_three")]
    pub conv_in_kernel: usize,
    #[serde(default = "default_three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
}

/// `only_cross_attention`: a flag for all blocks or one per down block.
#[derive(Clone, Debug, Deserialize, Serialize, Default, PartialEq)]
#[serde(untagged)]
pub enum OnlyCross {
    #[default]
    Unset,
    One(bool),
    Many(Vec<bool>),
}

fn default_sample_size() -> usize {
    64
}
fn default_four() -> usize {
    4
}
fn default_one_usize() -> usize {
    1
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_layers() -> PerBlock {
    PerBlock::One(2)
}
fn default_head_dim() -> PerBlock {
    PerBlock::One(8)
}
fn default_shift() -> String {
    "default".into()
}
fn default_time_type() -> String {
    "positional".into()
}

impl UNetConfig {
    /// Rejects the options this implementation does not support, naming them.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!("unet config: block_out_channels, down_block_types and up_block_types must have the same non-zero length");
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                bail!("unet config: unsupported down block type {t:?}");
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                bail!("unet config: unsupported up block type {t:?}");
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") | None => {}
            Some(t) => bail!("unet config: unsupported mid block type {t:?}"),
        }
        match (self.addition_embed_type.as_deref(), self.addition_time_embed_dim, self.projection_class_embeddings_input_dim) {
            (None, _, _) | (Some("text_time"), Some(_), Some(_)) => {}
            (Some("text_time"), _, _) => bail!(
                "unet config: addition_embed_type \"text_time\" needs addition_time_embed_dim and projection_class_embeddings_input_dim"
            ),
            (Some(t), _, _) => bail!("unet config: unsupported addition_embed_type {t:?}"),
        }
        let unsupported = [
            ("class_embed_type", self.class_embed_type.is_some()),
            ("reverse_transformer_layers_per_block", self.reverse_transformer_layers_per_block.as_ref().is_some_and(|v| !v.is_null())),
            ("dual_cross_attention", self.dual_cross_attention),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("resnet_time_scale_shift", self.resnet_time_scale_shift != "default"),
            ("time_embedding_type", self.time_embedding_type != "positional"),
            ("act_fn", self.act_fn != "silu"),
        ];
        for (name, bad) in unsupported {
            if bad {
                bail!("unet config: unsupported setting {name}");
            }
        }
        if self.block_out_channels.iter().any(|c| c % self.norm_num_groups != 0) {
            bail!("unet config: block_out_channels must be multiples of norm_num_groups");
        }
        self.heads()?;
        self.layers_per_block.expand(n, "layers_per_block")?;
        self.transformer_layers_per_block.expand(n, "transformer_layers_per_block")?;
        Ok(())
    }

    /// Attention heads per down block. diffusers reads `attention_head_dim` as the number of
    /// heads when `num_attention_heads` is unset (the SD 1.x/2.x config naming quirk).
    pub fn heads(&self) -> Result<Vec<usize>> {
        let n = self.block_out_channels.len();
        let heads = self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim);
        heads.expand(n, "attention_head_dim")
    }

    pub fn only_cross(&self) -> Vec<bool> {
        let n = self.block_out_channels.len();
        match &self.only_cross_attention {
            OnlyCross::Unset => vec![false; n],
            OnlyCross::One(b) => vec![*b; n],
            OnlyCross::Many(v) => v.clone(),
        }
    }

    /// Latent down-scaling of the UNet (each down block but the last halves the size).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// `vae/config.json` of an `AutoencoderKL`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct VaeConfig {
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    #[serde(default = "default_four")]
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_one_usize")]
    pub layers_per_block: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "default_vae_sample")]
    pub sample_size: usize,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_act")]
    pub act_fn: String,
    /// SDXL pipelines decode an f16 model's latents with the VAE in f32.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    /// Per-channel latent statistics some SDXL-family VAEs give (StableDiffusionXLPipeline
    /// uses them; SD 1.x/2.x pipelines ignore them).
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
}

fn default_vae_sample() -> usize {
    32
}

impl VaeConfig {
    pub fn validate(&self) -> Result<()> {
        if self.block_out_channels.is_empty() {
            bail!("vae config: block_out_channels is empty");
        }
        if self.act_fn != "silu" {
            bail!("vae config: unsupported act_fn {:?}", self.act_fn);
        }
        if self.block_out_channels.iter().any(|c| c % self.norm_num_groups != 0) {
            bail!("vae config: block_out_channels must be multiples of norm_num_groups");
        }
        Ok(())
    }

    /// Pixel-to-latent down-scaling factor.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// `model_index.json`: the pipeline class and the pipeline's own settings.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    /// `StableDiffusionXLPipeline`: without a negative prompt the unconditional embeddings are
    /// zeros instead of the encoded empty prompt.
    #[serde(default = "default_true")]
    pub force_zeros_for_empty_prompt: bool,
}

/// `text_encoder/config.json` of a transformers `CLIPTextModel` (or the `text_config` /
/// `vision_config` of a full `CLIPModel`).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

fn default_positions() -> usize {
    77
}
fn default_hidden_act() -> String {
    "quick_gelu".into()
}
fn default_eos() -> u32 {
    2
}

/// The `vision_config` of a transformers `CLIPModel` / `CLIPVisionModel`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_three")]
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

/// `scheduler/scheduler_config.json` (any of the diffusers schedulers this server implements
/// reads the same fields).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
    #[serde(default)]
    pub steps_offset: usize,
    /// DDIM's; see [`SchedulerConfig::set_alpha_to_one`].
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    /// DDIM's; see [`SchedulerConfig::clip_sample`].
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default = "default_one_f64")]
    pub clip_sample_range: f64,
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default)]
    pub thresholding: bool,
    /// `EulerDiscreteScheduler`'s sigma settings.
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub sigma_min: Option<f64>,
    #[serde(default)]
    pub sigma_max: Option<f64>,
    #[serde(default = "default_interpolation")]
    pub interpolation_type: String,
    #[serde(default = "default_final_sigmas")]
    pub final_sigmas_type: String,
    #[serde(default = "default_timestep_type")]
    pub timestep_type: String,
}

impl SchedulerConfig {
    /// Whether the config was written by `DDIMScheduler` (or names no class).
    fn is_ddim(&self) -> bool {
        matches!(self.class_name.as_str(), "" | "DDIMScheduler")
    }

    /// DDIM's `set_alpha_to_one`: as written; else diffusers' DDIM default (true) for a DDIM
    /// config, and for a config saved by another scheduler class (SDXL's Euler, which does
    /// not record DDIM fields) the Stable Diffusion releases' value, false.
    pub fn set_alpha_to_one(&self) -> bool {
        self.set_alpha_to_one.unwrap_or(self.is_ddim())
    }

    /// DDIM's `clip_sample`, defaulted like [`Self::set_alpha_to_one`].
    pub fn clip_sample(&self) -> bool {
        self.clip_sample.unwrap_or(self.is_ddim())
    }
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".into()
}
fn default_prediction() -> String {
    "epsilon".into()
}
fn default_interpolation() -> String {
    "linear".into()
}
fn default_final_sigmas() -> String {
    "zero".into()
}
fn default_timestep_type() -> String {
    "discrete".into()
}
fn default_spacing() -> String {
    "leading".into()
}

/// `tokenizer/tokenizer_config.json` (only the fields the CLIP tokenizer needs).
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
pub struct TokenizerConfig {
    #[serde(default)]
    pub model_max_length: Option<usize>,
    #[serde(default)]
    pub pad_token: Option<SpecialToken>,
    #[serde(default)]
    pub bos_token: Option<SpecialToken>,
    #[serde(default)]
    pub eos_token: Option<SpecialToken>,
}

/// A special token given as a string or as `{"content": "..."}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum SpecialToken {
    Plain(String),
    Added { content: String },
}

impl SpecialToken {
    pub fn content(&self) -> &str {
        match self {
            SpecialToken::Plain(s) => s,
            SpecialToken::Added { content } => content,
        }
    }
}
