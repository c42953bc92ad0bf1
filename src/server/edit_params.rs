//! Validation of edit requests: the image and mask decoded (with size limits) and resized to
//! the output size, the strength checked, on top of the generation checks of [`params`].

use candle_core::Device;

use super::api::{EditMode, EditParameters};
use super::config::ServerConfig;
use super::edit_form::EditForm;
use super::error::ApiError;
use super::jobs::EditInput;
use super::params::{self, Validated};
use crate::engine::edit::first_step;
use crate::engine::image::{decode, image_tensor, mask_tensor};
use crate::engine::pipeline::{ModelFamily, StableDiffusion};
use crate::stores::blobs::sha256_hex;

/// Largest side of an input image or mask, in pixels (checked before decoding its pixels).
pub const MAX_INPUT_SIDE: u32 = 4096;

/// diffusers' default strengths: `StableDiffusionImg2ImgPipeline` 0.8,
/// `StableDiffusionInpaintPipeline` 1, `StableDiffusionXLImg2ImgPipeline` 0.3,
/// `StableDiffusionXLInpaintPipeline` 0.9999.
fn default_strength(mode: EditMode, family: ModelFamily) -> f64 {
    match (mode, family) {
        (EditMode::ImageToImage, ModelFamily::Sdxl) => 0.3,
        (EditMode::Inpaint, ModelFamily::Sdxl) => 0.9999,
        (EditMode::ImageToImage, _) => 0.8,
        (EditMode::Inpaint, _) => 1.0,
    }
}

fn decode_field(field: &str, bytes: &[u8]) -> Result<image::DynamicImage, ApiError> {
    decode(bytes, MAX_INPUT_SIDE).map_err(|e| {
        ApiError::invalid(field, format!("{field}: {e:#} (PNG, JPEG or WebP, at most {MAX_INPUT_SIDE} pixels a side)"))
            .code("invalid_image")
    })
}

/// Validates an edit form against the limits and the model (blocking: decodes images).
pub fn validate(
    config: &ServerConfig,
    model_id: &str,
    model: &StableDiffusion,
    form: EditForm,
) -> Result<Validated, ApiError> {
    let EditForm { mut request, strength, image: image_file, mask: mask_file } = form;
    let image = decode_field("image", &image_file)?;
    if matches!(request.size.as_deref().map(str::trim), None | Some("" | "auto")) {
        // diffusers: the image's size, rounded down to a multiple of the VAE scale
        let f = model.vae_scale() as u32;
        let (w, h) = (image.width() / f * f, image.height() / f * f);
        if w == 0 || h == 0 {
            return Err(ApiError::invalid(
                "image",
                format!("the image is {}x{}; it must be at least {f} pixels a side", image.width(), image.height()),
            ));
        }
        request.size = Some(format!("{w}x{h}"));
    }
    let mut validated = params::validate(config, model_id, model, &request)?;
    let mode = if mask_file.is_some() { EditMode::Inpaint } else { EditMode::ImageToImage };
    let strength = strength.unwrap_or(default_strength(mode, model.family));
    first_step(validated.spec.steps, strength).map_err(|e| ApiError::invalid("strength", format!("{e:#}")))?;
    let spec = &mut validated.spec;
    let (w, h) = (spec.width as u32, spec.height as u32);
    let image = image_tensor(&image, w, h, &Device::Cpu).map_err(ApiError::from)?;
    let mask = match &mask_file {
        Some(bytes) => Some(mask_tensor(&decode_field("mask", bytes)?, w, h, &Device::Cpu).map_err(ApiError::from)?),
        None => None,
    };
    spec.edit = Some(EditInput { image, mask, strength });
    spec.parameters.edit = Some(EditParameters {
        mode,
        strength,
        image_sha256: sha256_hex(&image_file),
        mask_sha256: mask_file.as_deref().map(sha256_hex),
    });
    Ok(validated)
}
