//! JPEG compressibility: a differentiable estimate of the coded size from 8×8 DCT
//! coefficients of the luma channel against the JPEG quantisation table, and the true JPEG
//! size (image crate encoder) as the evaluation metric.

use candle_core::{DType, Device, Result, Tensor};

use super::Reward;

/// The standard JPEG luminance quantisation table (quality 50).
const LUMA_Q50: [f64; 64] = [
    16., 11., 10., 16., 24., 40., 51., 61., 12., 12., 14., 19., 26., 58., 60., 55., 14., 13., 16., 24., 40., 57.,
    69., 56., 14., 17., 22., 29., 51., 87., 80., 62., 18., 22., 37., 56., 68., 109., 103., 77., 24., 35., 55., 64.,
    81., 104., 113., 92., 49., 64., 78., 87., 103., 121., 120., 101., 72., 92., 95., 98., 112., 100., 103., 99.,
];

/// The quantisation table libjpeg uses at `quality` (1–100).
fn quant_table(quality: u8) -> Vec<f64> {
    let q = quality.clamp(1, 100) as f64;
    let s = if q < 50.0 { 5000.0 / q } else { 200.0 - 2.0 * q };
    LUMA_Q50.iter().map(|v| ((v * s + 50.0) / 100.0).floor().clamp(1.0, 255.0)).collect()
}

/// The orthonormal 8-point DCT-II matrix.
fn dct_matrix() -> Vec<f64> {
    let mut m = vec![0.0; 64];
    for k in 0..8 {
        let a = if k == 0 { (1.0f64 / 8.0).sqrt() } else { (2.0f64 / 8.0).sqrt() };
        for n in 0..8 {
            m[k * 8 + n] = a * (std::f64::consts::PI * (2 * n + 1) as f64 * k as f64 / 16.0).cos();
        }
    }
    m
}

/// Estimated bits per pixel of each image: Σ log2(1 + |DCT / Q|) over all 8×8 luma blocks,
/// divided by the pixel count. Images are cropped to multiples of 8.
pub fn estimated_bits_per_pixel(images: &Tensor, quality: u8) -> Result<Tensor> {
    let (b, _, h, w) = images.dims4()?;
    let (h8, w8) = (h / 8 * 8, w / 8 * 8);
    if h8 == 0 || w8 == 0 {
        candle_core::bail!("images must be at least 8x8 for the compressibility reward");
    }
    let dev = images.device();
    let dtype = images.dtype();
    let img = images.narrow(2, 0, h8)?.narrow(3, 0, w8)?;
    // ITU-R BT.601 luma, centred as JPEG does.
    let weights = Tensor::new(&[0.299f64, 0.587, 0.114], &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)?;
    let luma = ((img.broadcast_mul(&weights.reshape((1, 3, 1, 1))?)?.sum(1)? * 255.0)? - 128.0)?;
    let n = b * (h8 / 8) * (w8 / 8);
    let blocks = luma.reshape((b, h8 / 8, 8, w8 / 8, 8))?.permute((0, 1, 3, 2, 4))?.contiguous()?.reshape((n, 8, 8))?;
    let d = Tensor::from_vec(dct_matrix(), (8, 8), &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)?;
    // One explicit copy of D per block: candle's batched matmul rejects some broadcast layouts.
    let d_n = d.unsqueeze(0)?.expand((n, 8, 8))?.contiguous()?;
    let coeffs = d_n.matmul(&blocks)?.matmul(&d_n.t()?.contiguous()?)?.reshape((b, h8 / 8, w8 / 8, 8, 8))?;
    let q = Tensor::from_vec(quant_table(quality), (8, 8), &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)?;
    let scaled = coeffs.broadcast_div(&q)?;
    // Smooth |x| keeps the gradient defined at zero.
    let magnitude = (scaled.sqr()? + 1e-4)?.sqrt()?;
    let bits = ((magnitude + 1.0)?.log()? / std::f64::consts::LN_2)?;
    bits.flatten_from(1)?.sum(1)? / (h8 * w8) as f64
}

/// The size in bytes of each image encoded as a JPEG at `quality` (not differentiable).
pub fn jpeg_sizes(images: &Tensor, quality: u8) -> anyhow::Result<Vec<usize>> {
    let mut sizes = Vec::new();
    for i in 0..images.dim(0)? {
        let rgb = crate::engine::image::to_rgb(&images.get(i)?.to_dtype(DType::F32)?)?;
        sizes.push(crate::engine::image::encode(&rgb, crate::engine::image::OutputFormat::Jpeg, quality)?.len());
    }
    Ok(sizes)
}

/// Quality used by both JPEG rewards and their metric (as in the AlignProp/DDPO setups).
pub const JPEG_QUALITY: u8 = 95;

/// Rewards small JPEG files: minus the estimated bits per pixel.
pub struct Compressibility;

impl Reward for Compressibility {
    fn name(&self) -> &str {
        "compressibility"
    }

    fn score(&self, images: &Tensor, _prompts: &[String]) -> Result<Tensor> {
        estimated_bits_per_pixel(images, JPEG_QUALITY)?.neg()
    }
}

/// Rewards large JPEG files: the estimated bits per pixel.
pub struct Incompressibility;

impl Reward for Incompressibility {
    fn name(&self) -> &str {
        "incompressibility"
    }

    fn score(&self, images: &Tensor, _prompts: &[String]) -> Result<Tensor> {
        estimated_bits_per_pixel(images, JPEG_QUALITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::NoiseRng;

    #[test]
    fn estimate_ranks_images_like_the_real_encoder() {
        let flat = Tensor::full(0.5f32, (1, 3, 32, 32), &Device::Cpu).unwrap();
        let noisy = (NoiseRng::new(1).randn((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap() * 0.2)
            .unwrap()
            .affine(1.0, 0.5)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap();
        let smooth = Tensor::arange(0f32, 32.0, &Device::Cpu).unwrap().affine(1.0 / 32.0, 0.0).unwrap()
            .reshape((1, 1, 1, 32)).unwrap().repeat((1, 3, 32, 1)).unwrap();
        let imgs = Tensor::cat(&[&flat, &smooth, &noisy], 0).unwrap();
        let est = estimated_bits_per_pixel(&imgs, JPEG_QUALITY).unwrap().to_vec1::<f32>().unwrap();
        let real = jpeg_sizes(&imgs, JPEG_QUALITY).unwrap();
        assert!(est[0] < est[1] && est[1] < est[2], "{est:?}");
        assert!(real[0] < real[1] && real[1] < real[2], "{real:?}");
    }

    #[test]
    fn dct_is_orthonormal() {
        let d = Tensor::from_vec(dct_matrix(), (8, 8), &Device::Cpu).unwrap();
        let eye = d.matmul(&d.t().unwrap()).unwrap().to_vec2::<f64>().unwrap();
        for (i, row) in eye.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
    }
}
