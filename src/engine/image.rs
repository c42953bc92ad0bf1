//! Converting between decoded tensors and images, encoding images as PNG, JPEG or WebP, and
//! decoding input images and inpainting masks.

use std::io::Cursor;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, ImageFormat, RgbImage};
use serde::{Deserialize, Serialize};

/// An output file format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    pub fn mime(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }
}

impl std::str::FromStr for OutputFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "png" => Ok(OutputFormat::Png),
            "jpeg" | "jpg" => Ok(OutputFormat::Jpeg),
            "webp" => Ok(OutputFormat::Webp),
            _ => bail!("unknown output format {s:?} (expected png, jpeg or webp)"),
        }
    }
}

/// `[3, H, W]` (or `[1, 3, H, W]`) values in `[0, 1]` → 8-bit RGB, rounding as diffusers'
/// `numpy_to_pil` does.
pub fn to_rgb(image: &Tensor) -> Result<RgbImage> {
    let image = if image.rank() == 4 { image.squeeze(0)? } else { image.clone() };
    let (c, h, w) = image.dims3()?;
    if c != 3 {
        bail!("expected 3 channels, got {c}");
    }
    let pixels = (image.permute((1, 2, 0))?.to_dtype(DType::F32)?.clamp(0f32, 1f32)? * 255.0)?
        .round()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bytes = pixels.into_iter().map(|v| v as u8).collect();
    RgbImage::from_raw(w as u32, h as u32, bytes).ok_or_else(|| anyhow::anyhow!("image buffer size mismatch"))
}

/// Channel-major `[0, 1]` values of an image (the inverse of [`to_rgb`] up to rounding).
pub fn rgb_planes(img: &RgbImage) -> Vec<f32> {
    (0..3).flat_map(|c| img.pixels().map(move |p| p.0[c] as f32 / 255.0)).collect()
}

/// An image as a `[1, 3, H, W]` f32 tensor in `[0, 1]`.
pub fn from_rgb(img: &RgbImage, device: &candle_core::Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    Ok(Tensor::from_vec(rgb_planes(img), (1, 3, h as usize, w as usize), device)?)
}

/// Encodes an image; `quality` (0–100) applies to JPEG only (WebP is lossless here).
pub fn encode(img: &RgbImage, format: OutputFormat, quality: u8) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    match format {
        OutputFormat::Png => img.write_to(&mut out, ImageFormat::Png)?,
        OutputFormat::Webp => img.write_to(&mut out, ImageFormat::WebP)?,
        OutputFormat::Jpeg => {
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100));
            img.write_with_encoder(enc)?
        }
    }
    Ok(out.into_inner())
}

/// Decodes an image file (PNG, JPEG or WebP), refusing one wider or taller than `max_side`
/// pixels before its pixels are decoded.
pub fn decode(bytes: &[u8], max_side: u32) -> Result<DynamicImage> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .context("cannot read the image")?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    reader.limits(limits);
    if reader.format().is_none() {
        bail!("not an image file (PNG, JPEG or WebP)");
    }
    reader.decode().context("cannot decode the image")
}

/// The image as `[1, 3, height, width]` in `[0, 1]`: alpha dropped (PIL's `convert("RGB")`),
/// resized with a Lanczos filter when its size differs (diffusers' `VaeImageProcessor`).
pub fn image_tensor(img: &DynamicImage, width: u32, height: u32, device: &Device) -> Result<Tensor> {
    let rgb = img.to_rgb8();
    let rgb = if rgb.dimensions() == (width, height) {
        rgb
    } else {
        image::imageops::resize(&rgb, width, height, FilterType::Lanczos3)
    };
    from_rgb(&rgb, device)
}

/// An inpainting mask as `[1, 1, height, width]`: 1 repaints, 0 keeps. A mask with
/// transparent pixels repaints where it is more than half transparent (OpenAI's convention:
/// transparent = edit); any other repaints where it is white, luma ≥ 0.5 (diffusers': PIL's
/// `convert("L")`, resized like the image, then binarised).
pub fn mask_tensor(img: &DynamicImage, width: u32, height: u32, device: &Device) -> Result<Tensor> {
    let rgba = img.to_rgba8();
    let transparent = img.color().has_alpha() && rgba.pixels().any(|p| p.0[3] < 255);
    let gray = GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        if transparent {
            image::Luma([255 - a])
        } else {
            // PIL's ITU-R 601-2 luma, in its fixed-point form
            let l = (r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16;
            image::Luma([l as u8])
        }
    });
    let gray = if gray.dimensions() == (width, height) {
        gray
    } else {
        image::imageops::resize(&gray, width, height, FilterType::Lanczos3)
    };
    let values: Vec<f32> = gray.pixels().map(|p| if p.0[0] >= 128 { 1.0 } else { 0.0 }).collect();
    Ok(Tensor::from_vec(values, (1, 1, height as usize, width as usize), device)?)
}
