//! Every pipeline case of the fixture manifest reproduces diffusers' image from the stored
//! initial latents.

mod common;

use candle_core::{DType, Device};
use sdserve::engine::pipeline::{GenerateParams, StableDiffusion};
use sdserve::lora::{LoraAdapter, PipelineLora};
use serde_json::Value;

#[test]
fn manifest_cases_match_diffusers() {
    let dir = common::fixture_dir();
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference/manifest.json")).unwrap()).unwrap();
    let sd = StableDiffusion::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let latents = common::components()["vae_latents"].clone();
    let cases = manifest["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let ours = common::run_case(&sd, case, &latents);
        let p = common::psnr(&ours, &common::reference_image(&format!("reference/{name}.safetensors")));
        println!("{name}: PSNR {p:.1} dB");
        assert!(p >= 40.0, "{name}: PSNR {p:.1} dB < 40");
    }
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
