//! Broken model folders and files give errors that name the problem, never panics; the CLI
//! generates an image and reports bad arguments.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device};
use common::TempDir;
use sdserve::engine::pipeline::StableDiffusion;

/// A scratch copy of the fixture model.
fn copy_model(tag: &str) -> TempDir {
    let dst = TempDir::new(&format!("bad-{tag}"));
    copy_dir(&common::fixture_dir(), &dst.0);
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
}

fn load_error(dir: &Path) -> String {
    match StableDiffusion::load(dir, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn missing_config_file_is_named() {
    let tmp = copy_model("cfg");
    let dir = &tmp.0;
    std::fs::remove_file(dir.join("unet/config.json")).unwrap();
    let err = load_error(dir);
    assert!(err.contains("unet/config.json"), "{err}");
}

#[test]
fn missing_model_index_is_reported() {
    let tmp = copy_model("index");
    let dir = &tmp.0;
    std::fs::remove_file(dir.join("model_index.json")).unwrap();
    assert!(load_error(dir).contains("model_index.json"));
}

#[test]
fn corrupt_safetensors_is_reported() {
    let tmp = copy_model("corrupt");
    let dir = &tmp.0;
    let file = dir.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 3]).unwrap();
    let err = load_error(dir);
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

#[test]
fn wrong_tensor_shape_is_reported() {
    let tmp = copy_model("shape");
    let dir = &tmp.0;
    let cfg_path = dir.join("text_encoder/config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap().replace("\"intermediate_size\": 69", "\"intermediate_size\": 70");
    std::fs::write(&cfg_path, text).unwrap();
    let err = load_error(dir);
    assert!(err.contains("shape"), "{err}");
}

#[test]
fn cli_generates_a_png_and_rejects_bad_adapters() {
    let tmp = TempDir::new("cli");
    let out = tmp.0.join("out.png");
    let model = common::fixture_dir();
    let lora = model.join("loras/probe_kohya.safetensors");
    let status = Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt", "one red circle", "--steps", "3", "--seed", "7", "--width", "32", "--height", "32"])
        .arg("--lora")
        .arg(format!("{}:0.5", lora.display()))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));

    let bad = Command::new(env!("CARGO_BIN_EXE_sdserve"))
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt", "x", "--steps", "2", "--lora"])
        .arg(model.join("unet/config.json"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("error:") && !stderr.contains("panicked"), "{stderr}");
}
