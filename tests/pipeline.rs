//! Every pipeline case of the fixture manifests (SD 1.x and SDXL) reproduces diffusers' image
//! from the stored initial latents.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sdserve::engine::pipeline::{GenerateParams, ModelFamily, StableDiffusion};
use sdserve::lora::{LoraAdapter, PipelineLora};
use serde_json::Value;

fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let mse = (a - b).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    10.0 * (1.0 / mse).log10()
}

fn case_loras(case: &Value) -> Vec<(String, f64)> {
    let one = |v: &Value| (v["file"].as_str().unwrap().to_string(), v["scale"].as_f64().unwrap());
    match (&case["lora"], &case["loras"]) {
        (Value::Object(_), _) => vec![one(&case["lora"])],
        (_, Value::Array(list)) => list.iter().map(one).collect(),
        _ => vec![],
    }
}

/// The case's adapters loaded from `dir`, at their scales.
fn loras(sd: &StableDiffusion, dir: &Path, files: &[(String, f64)]) -> PipelineLora {
    let mut lora = PipelineLora::default();
    for (file, scale) in files {
        LoraAdapter::from_file(&dir.join(file), &sd.lora_targets, &Device::Cpu).unwrap().add_to(*scale, &mut lora);
    }
    lora
}

/// Our image `[H, W, 3]` for a manifest case, with `files` as its adapters.
fn draw(sd: &StableDiffusion, dir: &Path, case: &Value, files: &[(String, f64)]) -> Tensor {
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
        latents: Some(common::components_of(dir)["vae_latents"].clone()),
    };
    let image = sd.generate(&params, &loras(sd, dir, files), &mut |_, _| Ok(())).unwrap();
    image.squeeze(0).unwrap().permute((1, 2, 0)).unwrap()
}

fn reference(dir: &Path, name: &str) -> Tensor {
    candle_core::safetensors::load(dir.join(format!("reference/{name}.safetensors")), &Device::Cpu).unwrap()["image"].clone()
}

/// Checks every case of `dir/reference/manifest.json` at PSNR ≥ 40 dB; returns the cases.
fn check_manifest(dir: &Path, expected_cases: usize) -> (StableDiffusion, Vec<Value>) {
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference/manifest.json")).unwrap()).unwrap();
    let sd = StableDiffusion::load(dir, &Device::Cpu, DType::F32).unwrap();
    let cases = manifest["cases"].as_array().unwrap().clone();
    assert_eq!(cases.len(), expected_cases);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let p = psnr(&draw(&sd, dir, case, &case_loras(case)), &reference(dir, name));
        println!("{name}: PSNR {p:.1} dB");
        assert!(p >= 40.0, "{name}: PSNR {p:.1} dB < 40");
    }
    (sd, cases)
}

#[test]
fn manifest_cases_match_diffusers() {
    let (sd, _) = check_manifest(&common::fixture_dir(), 5);
    assert_eq!(sd.family, ModelFamily::Sd1);
}

#[test]
fn sdxl_manifest_cases_match_diffusers() {
    let dir = common::sdxl_fixture_dir();
    let (sd, cases) = check_manifest(&dir, 5);
    assert_eq!(sd.family, ModelFamily::Sdxl);
    // The kohya file holds the same UNet and text encoder weights (alpha = rank / 2, up doubled).
    let lora_case = cases.iter().find(|c| c["name"] == "ddim10_cfg5_probe_diffusers_0.8").unwrap();
    let kohya = [("loras/probe_kohya.safetensors".to_string(), 0.8)];
    let p = psnr(&draw(&sd, &dir, lora_case, &kohya), &reference(&dir, "ddim10_cfg5_probe_diffusers_0.8"));
    println!("kohya file against the diffusers file's reference: PSNR {p:.1} dB");
    assert!(p >= 40.0, "kohya: PSNR {p:.1} dB < 40");
}

#[test]
fn same_seed_same_image_and_lora_leaves_base_untouched() {
    let sd = StableDiffusion::load(&common::fixture_dir(), &Device::Cpu, DType::F32).unwrap();
    let params = GenerateParams { steps: 3, guidance_scale: 5.0, ..GenerateParams::new("one red circle", 42, 32, 32) };
    let none = PipelineLora::default();
    let run = |lora: &PipelineLora, seed: u64| {
        let p = GenerateParams { seed, ..params.clone() };
        sd.generate(&p, lora, &mut |_, _| Ok(())).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let a = run(&none, 42);
    assert_eq!(a, run(&none, 42), "same seed must give the same image");
    assert_ne!(a, run(&none, 43), "another seed must give another image");
    let mut lora = PipelineLora::default();
    LoraAdapter::from_file(&common::fixture_dir().join("loras/probe_diffusers.safetensors"), &sd.lora_targets, &Device::Cpu)
        .unwrap()
        .add_to(1.0, &mut lora);
    assert_ne!(a, run(&lora, 42), "the adapter must change the image");
    assert_eq!(a, run(&none, 42), "no adapter after an adapter run must be bit-identical");
}
