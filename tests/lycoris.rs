//! LyCORIS (LoHa, LoKr, LoCon with `lora_mid`) and DoRA adapters reproduce the images that
//! peft / diffusers make with them (scripts/lycoris_references.py), alone and together with
//! other adapters.

mod common;

use candle_core::{DType, Device};
use sdserve::engine::pipeline::StableDiffusion;
use sdserve::lora::{LoraAdapter, LoraFormat, TrainableLora};
use serde_json::Value;

fn load(name: &str, sd: &StableDiffusion) -> LoraAdapter {
    LoraAdapter::from_file(&common::fixture_dir().join("loras").join(name), &sd.lora_targets, &Device::Cpu).unwrap()
}

#[test]
fn reference_cases_match_peft_and_diffusers() {
    let dir = common::fixture_dir();
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference/lycoris/manifest.json")).unwrap())
            .unwrap();
    let sd = StableDiffusion::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let base = common::reference(&dir, "ddim10_cfg7.5");
    let cases = manifest["cases"].as_array().unwrap();
    let names: Vec<&str> = cases.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["loha_0.8", "lokr_-0.6", "locon_mid_0.9", "dora_0.8", "dora_kohya_0.8", "dora_in_0.7", "combined"]
    );
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let image = case["image"].as_str().unwrap();
        let ours = common::draw(&sd, &dir, case, &common::case_loras(case));
        let p = common::psnr(&ours, &common::reference(&dir, &format!("lycoris/{image}")));
        let change = common::psnr(&ours, &base);
        println!("{name}: PSNR {p:.1} dB against the reference, {change:.1} dB against no adapter");
        assert!(p >= 40.0, "{name}: PSNR {p:.1} dB < 40");
        assert!(change < 32.0, "{name}: the adapter barely changes the image ({change:.1} dB)");
    }
}

#[test]
fn files_report_their_factorisations() {
    let sd = StableDiffusion::load(&common::fixture_dir(), &Device::Cpu, DType::F32).unwrap();
    let cases: [(&str, LoraFormat, &[&str]); 6] = [
        ("loha_kohya.safetensors", LoraFormat::Kohya, &["loha"]),
        ("lokr_kohya.safetensors", LoraFormat::Kohya, &["lokr"]),
        ("locon_mid_kohya.safetensors", LoraFormat::Kohya, &["locon_tucker", "lora"]),
        ("dora_diffusers.safetensors", LoraFormat::Peft, &["dora", "lora"]),
        ("dora_kohya.safetensors", LoraFormat::Kohya, &["dora", "lora"]),
        ("dora_in_kohya.safetensors", LoraFormat::Kohya, &["dora", "lora"]),
    ];
    for (file, format, algorithms) in cases {
        let a = load(file, &sd);
        assert_eq!(a.format(), format, "{file}");
        assert_eq!(a.algorithms(), algorithms, "{file}");
        assert!(a.num_params() > 0 && a.size_bytes() == 4 * a.num_params(), "{file}");
    }
    let loha = load("loha_kohya.safetensors", &sd);
    assert_eq!(loha.rank(), 4);
    assert_eq!(loha.alpha(), Some(2.0));
    assert!(loha.target_modules().contains(&"q_proj".to_string()), "{:?}", loha.target_modules());
    // the diffusers file carries its alpha (8, rank 4) in the peft metadata
    let dora = load("dora_diffusers.safetensors", &sd);
    assert!(dora.modules().iter().all(|m| m.alpha == Some(8.0) && m.alpha_scale == 2.0));
    // only plain LoRA factors can be trained further
    for file in ["loha_kohya.safetensors", "dora_diffusers.safetensors"] {
        let err = TrainableLora::from_adapter(&load(file, &sd), DType::F32, &Device::Cpu).unwrap_err();
        assert!(format!("{err:#}").contains("can be trained further"), "{err:#}");
    }
}
