//! Image-to-image and inpainting reproduce diffusers' StableDiffusionImg2ImgPipeline and
//! StableDiffusionInpaintPipeline (4-channel UNet), and their SDXL counterparts, from the same
//! inputs and Gaussian draws (scripts/edit_references.py).

mod common;

use candle_core::{DType, Device, Tensor};
use sdserve::engine::edit::EditParams;
use sdserve::engine::image::{decode, image_tensor, mask_tensor};
use sdserve::engine::pipeline::{GenerateParams, StableDiffusion};
use sdserve::lora::PipelineLora;
use serde_json::Value;

fn edits_dir() -> std::path::PathBuf {
    common::fixture_dir().join("reference/edits")
}

fn load_image(name: &str) -> image::DynamicImage {
    decode(&std::fs::read(edits_dir().join(name)).unwrap(), 4096).unwrap()
}

/// Runs every case of `<model>/reference/edits/manifest.json` with the stored Gaussian draws.
fn check_manifest(model: &std::path::Path, expected_cases: usize) {
    let sd = StableDiffusion::load(model, &Device::Cpu, DType::F32).unwrap();
    let dir = model.join("reference/edits");
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let read = |name: &str| decode(&std::fs::read(dir.join(name)).unwrap(), 4096).unwrap();
    let image = image_tensor(&read("init.png"), 64, 64, &Device::Cpu).unwrap();
    let cases = manifest["cases"].as_array().unwrap();
    assert_eq!(cases.len(), expected_cases);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let reference = candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu).unwrap();
        let mask = case["mask"].as_str().map(|m| mask_tensor(&read(m), 64, 64, &Device::Cpu).unwrap());
        let lora = common::loras(&sd, model, &common::case_loras(case));
        let params = EditParams {
            generate: GenerateParams {
                negative_prompt: case["negative_prompt"].as_str().map(String::from),
                steps: case["steps"].as_u64().unwrap() as usize,
                guidance_scale: case["guidance_scale"].as_f64().unwrap(),
                scheduler: case["scheduler"].as_str().unwrap().parse().unwrap(),
                latents: Some(reference["noise"].clone()),
                ..GenerateParams::new(case["prompt"].as_str().unwrap(), 0, 64, 64)
            },
            image: image.clone(),
            mask,
            strength: case["strength"].as_f64().unwrap(),
            posterior_noise: Some(reference["posterior_noise"].clone()),
        };
        let mut steps = Vec::new();
        let out = sd.edit(&params, &lora, &mut |done, total| {
            steps.push((done, total));
            Ok(())
        });
        let ours = out.unwrap().squeeze(0).unwrap().permute((1, 2, 0)).unwrap();
        let p = common::psnr(&ours, &reference["image"]);
        println!("{name}: PSNR {p:.1} dB, {} steps run", steps.len());
        assert!(p >= 40.0, "{name}: PSNR {p:.1} dB < 40");
        let run = (params.generate.steps as f64 * params.strength) as usize;
        assert_eq!(steps, (1..=run).map(|d| (d, run)).collect::<Vec<_>>(), "{name}: progress");
    }
}

#[test]
fn edits_match_diffusers() {
    check_manifest(&common::fixture_dir(), 6);
}

#[test]
fn sdxl_edits_match_diffusers() {
    check_manifest(&common::sdxl_fixture_dir(), 3);
}

#[test]
fn masks_follow_diffusers_and_openai_conventions() {
    let mask = mask_tensor(&load_image("mask.png"), 64, 64, &Device::Cpu).unwrap();
    let at = |m: &Tensor, y: usize, x: usize| m.get(0).unwrap().get(0).unwrap().get(y).unwrap().get(x).unwrap().to_scalar::<f32>().unwrap();
    // white repaints, gray 120 (< 0.5) keeps, gray 140 repaints, black keeps
    assert_eq!([at(&mask, 10, 40), at(&mask, 10, 27), at(&mask, 36, 40), at(&mask, 50, 10)], [1.0, 0.0, 1.0, 0.0]);

    // An RGBA mask with transparency: transparent repaints, whatever its colour.
    let mut rgba = image::RgbaImage::from_pixel(8, 8, image::Rgba([0, 0, 0, 255]));
    rgba.put_pixel(1, 2, image::Rgba([0, 0, 0, 0]));
    rgba.put_pixel(3, 2, image::Rgba([255, 255, 255, 200]));
    let m = mask_tensor(&image::DynamicImage::ImageRgba8(rgba), 8, 8, &Device::Cpu).unwrap();
    assert_eq!([at(&m, 2, 1), at(&m, 2, 3), at(&m, 0, 0)], [1.0, 0.0, 0.0]);
    assert_eq!(m.sum_all().unwrap().to_scalar::<f32>().unwrap(), 1.0);

    // Other sizes are resized to the output size.
    let m = mask_tensor(&load_image("mask.png"), 32, 32, &Device::Cpu).unwrap();
    assert_eq!((m.dims(), at(&m, 5, 20), at(&m, 25, 5)), (&[1, 1, 32, 32][..], 1.0, 0.0));
    let img = image_tensor(&load_image("init.png"), 32, 48, &Device::Cpu).unwrap();
    assert_eq!(img.dims(), [1, 3, 48, 32]);
}

#[test]
fn bad_edit_inputs_are_errors() {
    let sd = StableDiffusion::load(&common::fixture_dir(), &Device::Cpu, DType::F32).unwrap();
    let image = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let params = EditParams {
        generate: GenerateParams { steps: 4, ..GenerateParams::new("x", 1, 32, 32) },
        image,
        mask: None,
        strength: 0.2,
        posterior_noise: None,
    };
    let err = |p: &EditParams| format!("{:#}", sd.edit(p, &PipelineLora::default(), &mut |_, _| Ok(())).unwrap_err());
    assert!(err(&params).contains("no step to run"), "{}", err(&params));
    let wrong_size = EditParams { generate: GenerateParams::new("x", 1, 64, 32), strength: 0.5, ..params.clone() };
    assert!(err(&wrong_size).contains("[1, 3, 32, 64]"), "{}", err(&wrong_size));
    // seeded edits are reproducible and the seed matters
    let ok = EditParams { strength: 0.5, ..params };
    let run = |p: &EditParams| sd.edit(p, &PipelineLora::default(), &mut |_, _| Ok(())).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(run(&ok), run(&ok));
    let other_seed = EditParams { generate: GenerateParams { seed: 2, ..ok.generate.clone() }, ..ok.clone() };
    assert_ne!(run(&ok), run(&other_seed));
    assert!(decode(b"not an image", 64).is_err());
    let big = image::RgbImage::new(100, 10);
    let mut png = Vec::new();
    big.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    assert!(format!("{:#}", decode(&png, 64).unwrap_err()).contains("limit"), "{:#}", decode(&png, 64).unwrap_err());
}
