//! Every pipeline case of the fixture manifest reproduces diffusers' image from the stored
//! initial latents.

mod common;

use candle_core::{DType, Device, Tensor};
use sdserve::engine::pipeline::{GenerateParams, StableDiffusion};
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
        let mut lora = PipelineLora::default();
        for (file, scale) in case_loras(case) {
            LoraAdapter::from_file(&dir.join(file), &sd.lora_targets, &Device::Cpu).unwrap().add_to(scale, &mut lora);
        }
        let params = GenerateParams {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance_scale: case["guidance_scale"].as_f64().unwrap(),
            seed: 0,
            width: case["width"].as_u64().unwrap() as usize,
            height: case["height"].as_u64().unwrap() as usize,
            scheduler: case["scheduler"].as_str().unwrap().parse().unwrap(),
            eta: case["eta"].as_f64().unwrap(),
            latents: Some(latents.clone()),
        };
        let image = sd.generate(&params, &lora, &mut |_, _| Ok(())).unwrap();
        let ours = image.squeeze(0).unwrap().permute((1, 2, 0)).unwrap();
        let reference = candle_core::safetensors::load(dir.join(format!("reference/{name}.safetensors")), &Device::Cpu)
            .unwrap()["image"]
            .clone();
        let p = psnr(&ours, &reference);
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
