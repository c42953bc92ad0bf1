//! Validation of generation requests: OpenAI fields and extensions → a [`JobSpec`] with every
//! default filled in, the seeds drawn and the adapters resolved.

use super::adapters::AdapterRegistry;
use super::api::{
    AppliedLora, GenerationParameters, ImageGenerationRequest, ResponseFormat, SchedulerName,
};
use super::config::ServerConfig;
use super::error::ApiError;
use super::jobs::JobSpec;
use crate::engine::pipeline::StableDiffusion;

/// Random seeds stay below 2^53 so that JavaScript clients can echo them back exactly.
const RANDOM_SEED_MASK: u64 = (1 << 53) - 1;

/// The size used when a request gives none: `--default-size`, else the UNet's native size.
pub fn default_size(config: &ServerConfig, model: &StableDiffusion) -> (u32, u32) {
    if let Some((w, h)) = config
        .defaults
        .default_size
        .as_deref()
        .and_then(super::api::parse_size)
    {
        return (w, h);
    }
    let side = model.native_size() as u32;
    (side, side)
}

/// Most prompt tokens: `--max-prompt-tokens`, else the encoder's context minus start/end.
pub fn max_prompt_tokens(config: &ServerConfig, model: &StableDiffusion) -> usize {
    config
        .limits
        .max_prompt_tokens
        .unwrap_or_else(|| model.tokenizer.max_content_tokens())
}

/// A request validated against the limits and the model, adapters not yet resolved.
pub struct Validated {
    pub spec: JobSpec,
    /// `(name, weight)` per requested adapter.
    pub lora_names: Vec<(String, f64)>,
}

pub fn validate(
    config: &ServerConfig,
    model_id: &str,
    model: &StableDiffusion,
    req: &ImageGenerationRequest,
) -> Result<Validated, ApiError> {
    let limits = &config.limits;
    if req.stream == Some(true) {
        return Err(ApiError::invalid(
            "stream",
            "streaming is not supported; submit to POST /v1/images/jobs and follow its events_url instead",
        )
        .code("unsupported_value"));
    }
    if req.response_format == Some(ResponseFormat::Url) {
        return Err(ApiError::invalid(
            "response_format",
            "response_format \"url\" is not supported; use \"b64_json\"",
        )
        .code("unsupported_value"));
    }
    let n = req.n.unwrap_or(1);
    if n < 1 || n > limits.max_n {
        return Err(ApiError::invalid(
            "n",
            format!("n must be between 1 and {}, got {n}", limits.max_n),
        ));
    }
    let (width, height) = match req.size.as_deref().map(str::trim) {
        None | Some("") | Some("auto") => default_size(config, model),
        Some(s) => super::api::parse_size(s).ok_or_else(|| {
            ApiError::invalid(
                "size",
                format!("size must look like WIDTHxHEIGHT (e.g. 512x512), got {s:?}"),
            )
        })?,
    };
    if width > limits.max_width
        || height > limits.max_height
        || (width as u64) * (height as u64) > limits.max_pixels
    {
        return Err(ApiError::invalid(
            "size",
            format!(
                "size {width}x{height} exceeds the limits (width ≤ {}, height ≤ {}, width×height ≤ {})",
                limits.max_width, limits.max_height, limits.max_pixels
            ),
        ));
    }
    if let Err(e) = model.latent_shape(width as usize, height as usize) {
        return Err(ApiError::invalid(
            "size",
            format!("invalid size {width}x{height}: {e:#}"),
        ));
    }
    let steps = req.steps.unwrap_or(config.defaults.default_steps);
    let max_steps = limits
        .max_steps
        .min(model.scheduler_config.num_train_timesteps as u32);
    if steps < 1 || steps > max_steps {
        return Err(ApiError::invalid(
            "steps",
            format!("steps must be between 1 and {max_steps}, got {steps}"),
        ));
    }
    let guidance_scale = req
        .guidance_scale
        .unwrap_or(config.defaults.default_guidance_scale);
    if !guidance_scale.is_finite() || !(0.0..=30.0).contains(&guidance_scale) {
        return Err(ApiError::invalid(
            "guidance_scale",
            format!("guidance_scale must be in 0..=30, got {guidance_scale}"),
        ));
    }
    let eta = req.eta.unwrap_or(0.0);
    if !eta.is_finite() || !(0.0..=1.0).contains(&eta) {
        return Err(ApiError::invalid(
            "eta",
            format!("eta must be in 0..=1, got {eta}"),
        ));
    }
    let scheduler_name = match req.scheduler {
        Some(s) => s,
        None => {
            SchedulerName::parse(&config.defaults.default_scheduler).unwrap_or(SchedulerName::Ddim)
        }
    };
    let scheduler = scheduler_name
        .kind()
        .map_err(|e| ApiError::invalid("scheduler", format!("{e:#}")))?;
    let output_format = req.output_format.unwrap_or_default();
    let output_compression = req.output_compression.unwrap_or(100);
    if output_compression > 100 {
        return Err(ApiError::invalid(
            "output_compression",
            format!("output_compression must be in 0..=100, got {output_compression}"),
        ));
    }
    let max_tokens = max_prompt_tokens(config, model);
    let negative_prompt = req.negative_prompt.clone();
    for (field, text) in [
        ("prompt", Some(&req.prompt)),
        ("negative_prompt", negative_prompt.as_ref()),
    ] {
        let Some(text) = text else { continue };
        let tokens = model.tokenizer.count_tokens(text);
        if tokens > max_tokens {
            return Err(ApiError::invalid(
                field,
                format!("{field} is {tokens} tokens long; the limit is {max_tokens}"),
            )
            .code("prompt_too_long"));
        }
    }
    let loras = req.loras.clone().unwrap_or_default();
    if loras.len() > limits.max_loras {
        return Err(ApiError::invalid(
            "loras",
            format!(
                "at most {} adapters per request, got {}",
                limits.max_loras,
                loras.len()
            ),
        ));
    }
    for (i, l) in loras.iter().enumerate() {
        if !l.weight.is_finite() || !(-10.0..=10.0).contains(&l.weight) {
            return Err(ApiError::invalid(
                &format!("loras[{i}].weight"),
                format!("adapter weight must be in -10..=10, got {}", l.weight),
            ));
        }
        if !crate::stores::registry::valid_name(&l.name) {
            return Err(ApiError::invalid(
                &format!("loras[{i}].name"),
                format!("invalid adapter name {:?}", l.name),
            )
            .code("invalid_adapter_name"));
        }
    }
    let first = req
        .seed
        .unwrap_or_else(|| crate::noise::random_seed() & RANDOM_SEED_MASK);
    let seeds: Vec<u64> = (0..n as u64).map(|i| first.wrapping_add(i)).collect();
    let parameters = GenerationParameters {
        model: model_id.to_string(),
        prompt: req.prompt.clone(),
        negative_prompt: negative_prompt.clone(),
        n,
        size: format!("{width}x{height}"),
        width,
        height,
        steps,
        guidance_scale,
        scheduler: scheduler_name,
        eta,
        seed: first,
        seeds: seeds.clone(),
        loras: Vec::new(),
        output_format,
        output_compression,
        edit: None,
    };
    Ok(Validated {
        spec: JobSpec {
            prompt: req.prompt.clone(),
            negative_prompt,
            steps: steps as usize,
            guidance_scale,
            width: width as usize,
            height: height as usize,
            scheduler,
            eta,
            seeds,
            loras: Vec::new(),
            output_format: output_format.into(),
            quality: output_compression.clamp(1, 100) as u8,
            parameters,
            edit: None,
        },
        lora_names: loras.into_iter().map(|l| (l.name, l.weight)).collect(),
    })
}

/// Resolves the requested adapters into the spec (blocking: may read and parse files).
pub async fn resolve_loras(registry: &AdapterRegistry, v: Validated) -> Result<JobSpec, ApiError> {
    let Validated {
        mut spec,
        lora_names,
    } = v;
    // One version per adapter for the whole request, even if it names one twice.
    let mut resolved: Vec<(String, crate::server::adapters::ResolvedAdapter)> = Vec::new();
    for (i, (name, weight)) in lora_names.into_iter().enumerate() {
        let adapter = match resolved.iter().find(|(n, _)| *n == name) {
            Some((_, a)) => a.clone(),
            None => {
                let a = registry
                    .resolve(&name)
                    .await
                    .map_err(|e| ApiError::from(e).param(format!("loras[{i}].name")))?;
                resolved.push((name.clone(), a.clone()));
                a
            }
        };
        spec.parameters.loras.push(AppliedLora {
            name: name.clone(),
            weight,
            sha256: adapter.sha256.clone(),
        });
        spec.loras.push((adapter, weight));
    }
    Ok(spec)
}
