//! SDXL's prompt encoding against diffusers' `encode_prompt` for the fixture, the conditioning
//! it builds (zero negatives, time ids), f16 weight files, the model's checks on its folder
//! and the family each folder gets.

mod common;

use candle_core::{DType, Device, IndexOp};
use sdserve::engine::pipeline::{GenerateParams, ModelFamily, StableDiffusion};
use sdserve::lora::PipelineLora;

const PROMPT: &str = "two red circles and a blue square";

fn load() -> StableDiffusion {
    StableDiffusion::load(&common::sdxl_fixture_dir(), &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn prompt_and_pooled_embeddings_match_diffusers() {
    let sd = load();
    assert_eq!(sd.family, ModelFamily::Sdxl);
    let refs = common::components_of(&common::sdxl_fixture_dir());
    // encode_prompt(prompt, negative_prompt=""): the empty negative prompt is encoded.
    let cond = sd.conditioning(PROMPT, Some(""), 5.0, (64, 64), &PipelineLora::default()).unwrap();
    let added = cond.added.as_ref().unwrap();
    for (name, ours) in [
        ("negative_prompt_embeds", cond.context.i(0..1).unwrap()),
        ("prompt_embeds", cond.context.i(1..2).unwrap()),
        ("negative_pooled_prompt_embeds", added.text_embeds.i(0..1).unwrap()),
        ("pooled_prompt_embeds", added.text_embeds.i(1..2).unwrap()),
    ] {
        assert_eq!(ours.dims(), refs[name].dims(), "{name}");
        let err = common::max_abs_diff(&ours, &refs[name]);
        println!("{name}: max abs err {err:e}");
        assert!(err <= 1e-4, "{name}: max abs err {err}");
    }
}

#[test]
fn conditioning_zeros_time_ids_and_guidance() {
    let sd = load();
    let none = PipelineLora::default();
    // No negative prompt: zero prompt and pooled embeddings (force_zeros_for_empty_prompt).
    let cond = sd.conditioning(PROMPT, None, 5.0, (64, 32), &none).unwrap();
    let added = cond.added.as_ref().unwrap();
    let zero = |t: &candle_core::Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() == 0.0;
    assert!(zero(&cond.context.i(0).unwrap()) && zero(&added.text_embeds.i(0).unwrap()));
    let with_text = sd.conditioning(PROMPT, Some(""), 5.0, (64, 32), &none).unwrap();
    assert_eq!(common::max_abs_diff(&cond.context.i(1).unwrap(), &with_text.context.i(1).unwrap()), 0.0);
    // (original h, w), crop (top, left), (target h, w), for both rows.
    let ids = added.time_ids.to_vec2::<f32>().unwrap();
    assert_eq!(ids, vec![vec![32.0, 64.0, 0.0, 0.0, 32.0, 64.0]; 2]);
    // Guidance off: the prompt alone.
    let single = sd.conditioning(PROMPT, None, 1.0, (64, 64), &none).unwrap();
    assert_eq!((single.context.dims(), single.added.unwrap().time_ids.dims()), (&[1, 77, 64][..], &[1, 6][..]));
}

#[test]
fn folders_that_do_not_fit_are_refused_by_name() {
    let tmp = common::TempDir::new("sdxl-folder");
    let copy = |to: &std::path::Path| common::copy_model(&common::sdxl_fixture_dir(), to);
    let err = |dir: &std::path::Path| format!("{:#}", StableDiffusion::load(dir, &Device::Cpu, DType::F32).err().unwrap());

    // A refiner-like folder without the second text encoder.
    let no_te2 = tmp.0.join("no-te2");
    copy(&no_te2);
    std::fs::remove_dir_all(no_te2.join("text_encoder_2")).unwrap();
    assert!(err(&no_te2).contains("has no text_encoder_2/"), "{}", err(&no_te2));

    // A UNet whose added-embedding width does not fit the encoders.
    let bad = tmp.0.join("bad-dim");
    copy(&bad);
    let cfg_path = bad.join("unet/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["addition_time_embed_dim"] = 4.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert!(err(&bad).contains("projection_class_embeddings_input_dim"), "{}", err(&bad));
    cfg["addition_time_embed_dim"] = serde_json::Value::Null;
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert!(err(&bad).contains("needs addition_time_embed_dim"), "{}", err(&bad));

    // A VAE with latent statistics, which StableDiffusionXLPipeline would apply.
    let stats = tmp.0.join("latent-stats");
    copy(&stats);
    let vae_path = stats.join("vae/config.json");
    let mut vae: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&vae_path).unwrap()).unwrap();
    vae["latents_mean"] = serde_json::json!([0.0, 0.1, 0.2, 0.3]);
    vae["latents_std"] = serde_json::json!([1.0, 1.1, 1.2, 1.3]);
    std::fs::write(&vae_path, vae.to_string()).unwrap();
    assert!(err(&stats).contains("latents_mean / latents_std"), "{}", err(&stats));
}

#[test]
fn the_family_follows_the_folder() {
    // SD 2.x differs from SD 1.x by its OpenCLIP text encoder (`hidden_act: gelu`).
    let tmp = common::TempDir::new("sd2-folder");
    common::copy_model(&common::fixture_dir(), &tmp.0);
    let cfg_path = tmp.0.join("text_encoder/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["hidden_act"] = "gelu".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let sd2 = StableDiffusion::load(&tmp.0, &Device::Cpu, DType::F32).unwrap();
    assert_eq!((sd2.family, sd2.sdxl.is_none()), (ModelFamily::Sd2, true));
    let sd1 = StableDiffusion::load(&common::fixture_dir(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(sd1.family, ModelFamily::Sd1);
}

#[test]
fn fp16_weight_files_draw_what_the_f32_files_draw_in_f16() {
    // diffusers' `variant="fp16"` layout: `<stem>.fp16.safetensors` only.
    let tmp = common::TempDir::new("sdxl-fp16");
    common::copy_model(&common::sdxl_fixture_dir(), &tmp.0);
    for (part, stem) in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model"), ("text_encoder_2", "model")] {
        let f32_file = tmp.0.join(part).join(format!("{stem}.safetensors"));
        let tensors = candle_core::safetensors::load(&f32_file, &Device::Cpu).unwrap();
        let half: std::collections::HashMap<String, candle_core::Tensor> =
            tensors.into_iter().map(|(k, t)| (k, t.to_dtype(DType::F16).unwrap())).collect();
        candle_core::safetensors::save(&half, tmp.0.join(part).join(format!("{stem}.fp16.safetensors"))).unwrap();
        std::fs::remove_file(f32_file).unwrap();
    }
    let params = GenerateParams { steps: 3, guidance_scale: 5.0, ..GenerateParams::new(PROMPT, 5, 32, 32) };
    let draw = |dir: &std::path::Path| {
        let sd = StableDiffusion::load(dir, &Device::Cpu, DType::F16).unwrap();
        assert_eq!(sd.vae_dtype, DType::F32, "force_upcast");
        let image = sd.generate(&params, &PipelineLora::default(), &mut |_, _| Ok(())).unwrap();
        image.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let from_fp16_files = draw(&tmp.0);
    assert_eq!(from_fp16_files, draw(&common::sdxl_fixture_dir()));
    assert!(from_fp16_files.iter().all(|v| v.is_finite()));
}
