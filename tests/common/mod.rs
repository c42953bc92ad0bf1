//! Helpers shared by the integration tests: fixture paths, scratch folders and tensor
//! comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Tensor};

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
