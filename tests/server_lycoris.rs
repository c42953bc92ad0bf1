//! LyCORIS and DoRA adapters over HTTP (uploaded, listed, used alone and with others), and
//! adapters with non-finite or absurd values refused at upload and at pickup.

mod server_support;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use reqwest::StatusCode;
use serde_json::{json, Value};
use server_support::{assert_error, fixture_lora, start};

fn req(loras: Value) -> Value {
    json!({"prompt": "two red circles and a blue square", "size": "64x64", "steps": 3,
           "guidance_scale": 7.5, "seed": 5, "loras": loras})
}

/// The bytes of fixture adapter `name` with `f` applied to the tensor `key`.
fn patched(name: &str, key: &str, f: impl Fn(&Tensor) -> Tensor) -> Vec<u8> {
    let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(fixture_lora(name), &Device::Cpu).unwrap();
    let new = f(&tensors[key]);
    tensors.insert(key.to_string(), new);
    let dir = std::env::temp_dir().join(format!("sdserve-patched-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("a.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    bytes
}

const KOHYA_Q: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";

#[test]
fn lycoris_and_dora_adapters_over_http() {
    let s = start(|_| {});
    for name in ["loha_kohya", "lokr_kohya", "dora_diffusers"] {
        let resp = s.put_bytes(&format!("/v1/adapters/{name}"), std::fs::read(fixture_lora(name)).unwrap());
        assert_eq!(resp.status(), StatusCode::CREATED, "{}", resp.text().unwrap());
    }
    let loha: Value = s.get("/v1/adapters/loha_kohya").json().unwrap();
    assert_eq!((loha["format"].as_str(), loha["rank"].as_u64(), loha["alpha"].as_f64()), (Some("kohya"), Some(4), Some(2.0)));
    let dora: Value = s.get("/v1/adapters/dora_diffusers").json().unwrap();
    assert_eq!(dora["format"], "peft");

    let base = s.image_b64(req(json!([])));
    let mut images = vec![base.clone()];
    for loras in [
        json!([{"name": "loha_kohya", "weight": 0.8}]),
        json!([{"name": "lokr_kohya", "weight": -0.6}]),
        json!([{"name": "dora_diffusers", "weight": 0.8}]),
        json!([{"name": "loha_kohya", "weight": 0.5}, {"name": "lokr_kohya", "weight": 0.7},
               {"name": "dora_diffusers", "weight": 0.6}, {"name": "probe_diffusers", "weight": 0.5}]),
    ] {
        let image = s.image_b64(req(loras.clone()));
        assert!(!images.contains(&image), "{loras} gives an image already seen");
        images.push(image);
    }
    assert_eq!(s.image_b64(req(json!([]))), base, "no adapter after adapters is the base image");
}

#[test]
fn non_finite_and_absurd_adapters_are_refused_at_upload_and_pickup() {
    let s = start(|_| {});
    let nan = patched("probe_kohya", &format!("{KOHYA_Q}.lora_up.weight"), |t| {
        let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[0] = f32::NAN;
        Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap()
    });
    let huge = patched("probe_kohya", &format!("{KOHYA_Q}.lora_down.weight"), |t| (t * 1e30).unwrap());
    let alpha = patched("probe_kohya", &format!("{KOHYA_Q}.alpha"), |_| Tensor::new(1e308f64, &Device::Cpu).unwrap());
    for (name, bytes, expect) in [
        ("nan", &nan, "non-finite"),
        ("huge", &huge, "beyond ±65504"),
        ("alpha", &alpha, "beyond ±65504"),
    ] {
        let err = assert_error(s.put_bytes(&format!("/v1/adapters/{name}"), bytes.clone()), StatusCode::BAD_REQUEST);
        let message = err["message"].as_str().unwrap();
        assert_eq!(err["code"], "invalid_adapter");
        assert!(message.contains(expect) && message.contains(KOHYA_Q), "{name}: {message}");
    }
    // Dropped into the folder instead: listed with the error, a 400 when a request names it.
    std::fs::write(s.adapters_dir.join("dropped_nan.safetensors"), &nan).unwrap();
    let err = assert_error(s.post_json("/v1/images/generations", &req(json!([{"name": "dropped_nan"}]))), StatusCode::BAD_REQUEST);
    assert!(err["message"].as_str().unwrap().contains("non-finite"), "{err}");
    assert_eq!(err["param"], "loras[0].name");
    let info: Value = s.get("/v1/adapters/dropped_nan").json().unwrap();
    assert!(info["error"].as_str().is_some_and(|e| e.contains("non-finite")), "{info}");
    s.assert_still_serving();
}
