//! Helpers shared by the integration tests: fixture paths, scratch folders and tensor
//! comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Tensor};
use sdserve::engine::pipeline::{GenerateParams, StableDiffusion};
use sdserve::lora::{LoraAdapter, PipelineLora};

/// The tiny diffusers-made SD 1.x pipeline copied from the shared fixtures.
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1")
}

/// The tiny diffusers-made SDXL pipeline copied from the shared fixtures.
pub fn sdxl_fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl")
}

/// A fresh, empty folder under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("sdserve-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies a model folder's files (not `reference/` or `loras/`) to `to`.
pub fn copy_model(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if entry.file_type().unwrap().is_dir() {
            if name != "reference" && name != "loras" {
                copy_model(&entry.path(), &to.join(&name));
            }
        } else {
            std::fs::create_dir_all(to).unwrap();
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}

/// The reference tensors of `reference/components.safetensors`.
pub fn components() -> HashMap<String, Tensor> {
    components_of(&fixture_dir())
}

/// The reference tensors of a fixture folder's `reference/components.safetensors`.
pub fn components_of(dir: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference/components.safetensors"), &Device::Cpu)
        .expect("reference components")
}

/// Largest absolute element-wise difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(candle_core::DType::F64).unwrap();
    let b = b.to_dtype(candle_core::DType::F64).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// Peak signal-to-noise ratio of two images in [0, 1], in dB.
pub fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let mse = (a - b).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    10.0 * (1.0 / mse).log10()
}

/// The `{file, scale}` adapters of a manifest case (`lora` or `loras`).
pub fn case_loras(case: &serde_json::Value) -> Vec<(String, f64)> {
    use serde_json::Value;
    let one = |v: &Value| (v["file"].as_str().unwrap().to_string(), v["scale"].as_f64().unwrap());
    match (&case["lora"], &case["loras"]) {
        (Value::Object(_), _) => vec![one(&case["lora"])],
        (_, Value::Array(list)) => list.iter().map(one).collect(),
        _ => vec![],
    }
}

/// The adapters `files` (relative to the fixture `dir`) loaded at their scales.
pub fn loras(sd: &StableDiffusion, dir: &Path, files: &[(String, f64)]) -> PipelineLora {
    let mut lora = PipelineLora::default();
    for (file, scale) in files {
        LoraAdapter::from_file(&dir.join(file), &sd.lora_targets, &Device::Cpu).unwrap().add_to(*scale, &mut lora);
    }
    lora
}

/// Our image `[H, W, 3]` (f32) for a manifest case of the fixture `dir`, from its
/// `vae_latents`, with `files` as its adapters.
pub fn draw(sd: &StableDiffusion, dir: &Path, case: &serde_json::Value, files: &[(String, f64)]) -> Tensor {
    let params = GenerateParams {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().map(String::from),
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        seed: 0,
        width: case["width"].as_u64().unwrap() as usize,
        height: case["height"].as_u64().unwrap() as usize,
        scheduler: case["scheduler"].as_str().unwrap().parse().unwrap(),
        eta: case["eta"].as_f64().unwrap(),
        latents: Some(components_of(dir)["vae_latents"].clone()),
    };
    let image = sd.generate(&params, &loras(sd, dir, files), &mut |_, _| Ok(())).unwrap();
    image.to_dtype(candle_core::DType::F32).unwrap().squeeze(0).unwrap().permute((1, 2, 0)).unwrap()
}

/// The `image` of `dir/reference/<name>.safetensors`.
pub fn reference(dir: &Path, name: &str) -> Tensor {
    candle_core::safetensors::load(dir.join(format!("reference/{name}.safetensors")), &Device::Cpu).unwrap()["image"].clone()
}

/// Whether a job (image or /align, as the API returns it) has ended.
pub fn terminal(job: &serde_json::Value) -> bool {
    matches!(job["status"].as_str(), Some("succeeded" | "failed" | "cancelled"))
}

/// An /align request that trains quickly on the fixture model (32×32, brightness reward).
pub fn align_request(name: &str, steps: usize, sampler_steps: usize, k: usize) -> serde_json::Value {
    serde_json::json!({
        "adapter_name": name,
        "prompts": ["two red circles", "a blue square"],
        "rewards": [{"reward": "brightness", "weight": 1.0}],
        "steps": steps,
        "learning_rate": 0.01,
        "sampler_steps": sampler_steps,
        "truncation": {"k": k},
        "guidance_scale": 3.0,
        "width": 32,
        "height": 32,
        "seed": 3
    })
}
