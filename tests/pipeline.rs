//! Every pipeline case of the fixture manifests (SD 1.x and SDXL) reproduces diffusers' image
//! from the stored initial latents.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device};
use sdserve::engine::pipeline::{GenerateParams, ModelFamily, StableDiffusion};
use sdserve::lora::{LoraAdapter, PipelineLora};
use sdserve::model::config::SchedulerConfig;
use serde_json::Value;

/// A loaded fixture model per dtype, with its scheduler config as the folder gives it.
struct Models {
    dir: PathBuf,
    loaded: HashMap<&'static str, (StableDiffusion, SchedulerConfig)>,
}

impl Models {
    fn new(dir: PathBuf) -> Self {
        Self { dir, loaded: HashMap::new() }
    }

    /// The model in the case's dtype, its scheduler config overlaid with the case's
    /// `scheduler_config` fields.
    fn for_case(&mut self, case: &Value) -> &StableDiffusion {
        let dtype = match case["dtype"].as_str().unwrap_or("f32") {
            "f16" => "f16",
            _ => "f32",
        };
        let dir = &self.dir;
        let (sd, base) = self.loaded.entry(dtype).or_insert_with(|| {
            let sd = StableDiffusion::load(dir, &Device::Cpu, if dtype == "f16" { DType::F16 } else { DType::F32 }).unwrap();
            let base = sd.scheduler_config.clone();
            (sd, base)
        });
        let mut cfg = serde_json::to_value(&*base).unwrap();
        if let Value::Object(overrides) = &case["scheduler_config"] {
            for (k, v) in overrides {
                cfg[k] = v.clone();
            }
        }
        sd.scheduler_config = serde_json::from_value(cfg).unwrap();
        sd
    }
}

/// Checks every case of `dir/reference/<manifest>` at PSNR ≥ 40 dB; returns the cases.
fn check_manifest(models: &mut Models, manifest: &str, expected_cases: usize) -> Vec<Value> {
    let dir = models.dir.clone();
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference").join(manifest)).unwrap()).unwrap();
    let cases = manifest["cases"].as_array().unwrap().clone();
    assert_eq!(cases.len(), expected_cases);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let p = common::psnr(&common::draw(models.for_case(case), &dir, case, &common::case_loras(case)), &common::reference(&dir, name));
        println!("{name}: PSNR {p:.1} dB");
        assert!(p >= 40.0, "{name}: PSNR {p:.1} dB < 40");
    }
    cases
}

/// Draws the case with a kohya file in place of its diffusers one, against the same reference.
fn check_kohya(models: &mut Models, cases: &[Value], name: &str, kohya_file: &str) {
    let dir = models.dir.clone();
    let case = cases.iter().find(|c| c["name"] == name).unwrap();
    let scale = common::case_loras(case)[0].1;
    let image = common::draw(models.for_case(case), &dir, case, &[(kohya_file.to_string(), scale)]);
    let p = common::psnr(&image, &common::reference(&dir, name));
    println!("{kohya_file} against {name}: PSNR {p:.1} dB");
    assert!(p >= 40.0, "{kohya_file}: PSNR {p:.1} dB < 40");
}

#[test]
fn manifest_cases_match_diffusers() {
    let mut models = Models::new(common::fixture_dir());
    check_manifest(&mut models, "manifest.json", 5);
    // Euler, and a LoRA on the text encoder (transformers 5 keys) and UNet, also in kohya naming.
    let extra = check_manifest(&mut models, "extra_manifest.json", 2);
    check_kohya(&mut models, &extra, "ddim10_cfg7.5_te_probe_diffusers_0.8", "loras/te_probe_kohya.safetensors");
    assert_eq!(models.for_case(&extra[0]).family, ModelFamily::Sd1);
}

#[test]
fn sdxl_manifest_cases_match_diffusers() {
    let mut models = Models::new(common::sdxl_fixture_dir());
    let cases = check_manifest(&mut models, "manifest.json", 5);
    // The kohya file holds the same UNet and text encoder weights (alpha = rank / 2, up doubled).
    check_kohya(&mut models, &cases, "ddim10_cfg5_probe_diffusers_0.8", "loras/probe_kohya.safetensors");
    // No negative prompt (zero embeddings), Euler's spacings and Karras sigmas, a kohya LoRA on
    // every UNet layer in the sgm naming sd-scripts writes for SDXL, float16.
    check_manifest(&mut models, "extra_manifest.json", 6);
    let f16 = models.loaded.get("f16").map(|(sd, _)| (sd.family, sd.vae_dtype));
    assert_eq!(f16, Some((ModelFamily::Sdxl, DType::F32)), "force_upcast keeps the f16 model's VAE in f32");
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
