//! Seeded Gaussian noise (candle's CPU RNG cannot be seeded), so a seed reproduces an image.

use candle_core::{DType, Device, Result, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// A ChaCha8 stream of standard normals and uniforms.
pub struct NoiseRng(ChaCha8Rng);

impl NoiseRng {
    pub fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }

    /// A tensor of independent N(0, 1) draws.
    pub fn randn(&mut self, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let data: Vec<f64> = (0..shape.elem_count()).map(|_| self.0.sample(StandardNormal)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }

    /// A tensor of independent U[0, 1) draws.
    pub fn uniform(&mut self, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let data: Vec<f64> = (0..shape.elem_count()).map(|_| self.0.random::<f64>()).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }
}

/// A fresh seed from OS entropy, for requests that give none.
pub fn random_seed() -> u64 {
    rand::rng().random_range(0..(1u64 << 53))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise() {
        let a = NoiseRng::new(5).randn((2, 3), DType::F32, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let b = NoiseRng::new(5).randn((2, 3), DType::F32, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let c = NoiseRng::new(6).randn((2, 3), DType::F32, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(random_seed(), random_seed());
    }

    #[test]
    fn draws_are_standard_normal() {
        let v = NoiseRng::new(1).randn(20000, DType::F64, &Device::Cpu).unwrap().to_vec1::<f64>().unwrap();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
    }
}
