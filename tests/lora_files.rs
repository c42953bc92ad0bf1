//! Adapter files: format detection, scales, validation errors and the diffusers writer.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::TempDir;
use sdserve::lora::{
    save_diffusers, Component, LoraAdapter, LoraFormat, LoraTargets, PipelineLora,
};

type Tensors = BTreeMap<String, Tensor>;

const Q: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";

fn targets() -> LoraTargets {
    let dir = common::fixture_dir();
    LoraTargets::from_files(
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        &dir.join("text_encoder/model.safetensors"),
    )
    .unwrap()
}

fn lora_path(name: &str) -> PathBuf {
    common::fixture_dir().join("loras").join(name)
}

fn load(name: &str) -> LoraAdapter {
    LoraAdapter::from_file(&lora_path(name), &targets(), &Device::Cpu).unwrap()
}

fn tensors(name: &str) -> Tensors {
    candle_core::safetensors::load(lora_path(name), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// The elements of a 1-d tensor as little-endian bytes.
fn le_bytes<T: candle_core::WithDType, const N: usize>(t: &Tensor, to_le: fn(T) -> [u8; N]) -> Vec<u8> {
    t.to_vec1::<T>().unwrap().into_iter().flat_map(to_le).collect()
}

/// Writes f32 / f16 / f64 tensors as safetensors with the given header metadata.
fn write(path: &Path, tensors: &Tensors, metadata: &[(&str, &str)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, t) in tensors {
        let t = t.flatten_all().unwrap();
        let (dtype, bytes) = match t.dtype() {
            DType::F64 => ("F64", le_bytes(&t, f64::to_le_bytes)),
            DType::F16 => ("F16", le_bytes(&t, half::f16::to_le_bytes)),
            _ => ("F32", le_bytes(&t, f32::to_le_bytes)),
        };
        let shape = tensors[name].dims().to_vec();
        let offsets = [data.len(), data.len() + bytes.len()];
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": offsets }),
        );
        data.extend(bytes);
    }
    if !metadata.is_empty() {
        let meta: serde_json::Map<_, _> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        header.insert("__metadata__".into(), meta.into());
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `scale · up · down` of the single delta at `path`.
fn delta_weight(lora: &PipelineLora, component: Component, path: &str) -> Tensor {
    let [d] = lora.component(component).get(path) else {
        panic!("expected one delta at {path}")
    };
    let (down, up) = d.update.low_rank().expect("a low-rank delta");
    (up.matmul(down).unwrap() * d.scale).unwrap()
}

#[test]
fn probe_files_give_the_same_deltas() {
    let diffusers = load("probe_diffusers.safetensors");
    let kohya = load("probe_kohya.safetensors");
    assert_eq!(diffusers.format(), LoraFormat::Diffusers);
    assert_eq!(kohya.format(), LoraFormat::Kohya);

    let attentions = targets()
        .modules(Component::Unet)
        .filter(|(p, _)| p.ends_with(".to_q"))
        .count();
    assert!(attentions > 0);
    for a in [&diffusers, &kohya] {
        assert_eq!(a.num_modules(), 4 * attentions);
        assert_eq!(a.rank(), 4);
        assert_eq!(a.target_modules(), ["to_k", "to_out.0", "to_q", "to_v"]);
        assert_eq!(a.size_bytes(), 4 * a.num_params());
    }
    assert_eq!(diffusers.alpha(), None);
    assert_eq!(kohya.alpha(), Some(2.0));

    let (mut from_diffusers, mut from_kohya) = (PipelineLora::default(), PipelineLora::default());
    diffusers.add_to(0.8, &mut from_diffusers);
    kohya.add_to(0.8, &mut from_kohya);
    assert_eq!(from_diffusers.unet.num_modules(), diffusers.num_modules());
    assert!(from_diffusers.text_encoder.is_empty());
    for m in diffusers.modules() {
        assert_eq!(m.component, Component::Unet);
        let a = delta_weight(&from_diffusers, m.component, &m.path);
        let b = delta_weight(&from_kohya, m.component, &m.path);
        assert!(max_abs_diff(&a, &b) <= 1e-6, "{}", m.path);
    }
}

#[test]
fn other_adapter_summary() {
    let other = load("other_diffusers.safetensors");
    assert_eq!(other.format(), LoraFormat::Diffusers);
    assert_eq!(other.rank(), 2);
    assert_eq!(other.target_modules(), ["to_q", "to_v"]);
    assert_eq!(
        serde_json::to_string(&other.format()).unwrap(),
        "\"diffusers\""
    );
}

#[test]
fn save_diffusers_round_trips() {
    let tmp = TempDir::new("lora-files");
    let probe = load("probe_diffusers.safetensors");
    let modules: Vec<_> = probe
        .modules()
        .iter()
        .map(|m| {
            let (down, up) = m.update.low_rank().unwrap();
            (m.path.clone(), down.clone(), up.clone())
        })
        .collect();
    let path = tmp.0.join("saved.safetensors");
    save_diffusers(
        &path,
        &modules,
        &HashMap::from([("step".to_string(), "3".to_string())]),
    )
    .unwrap();

    let mut keys: Vec<_> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        tensors("probe_diffusers.safetensors")
            .into_keys()
            .collect::<Vec<_>>()
    );
    let saved = LoraAdapter::from_file(&path, &targets(), &Device::Cpu).unwrap();
    assert_eq!(saved.format(), LoraFormat::Diffusers);
    assert_eq!(saved.num_modules(), probe.num_modules());
    for (a, b) in probe.modules().iter().zip(saved.modules()) {
        assert_eq!(a.path, b.path);
        let (ad, au) = a.update.low_rank().unwrap();
        let (bd, bu) = b.update.low_rank().unwrap();
        assert_eq!(max_abs_diff(ad, bd), 0.0);
        assert_eq!(max_abs_diff(au, bu), 0.0);
    }
    assert!(save_diffusers(&path, &[], &HashMap::new()).is_err());
}

#[test]
fn peft_and_text_encoder_keys() {
    let tmp = TempDir::new("lora-files");
    let targets = targets();
    let probe = tensors("probe_diffusers.safetensors");
    let peft: Tensors = probe
        .iter()
        .map(|(k, t)| {
            (
                k.replace(".lora.down.", ".lora_A.")
                    .replace(".lora.up.", ".lora_B."),
                t.clone(),
            )
        })
        .collect();
    let path = tmp.0.join("peft.safetensors");
    write(
        &path,
        &peft,
        &[(
            "lora_adapter_metadata",
            r#"{"unet.r": 4, "unet.lora_alpha": 2}"#,
        )],
    );
    let a = LoraAdapter::from_file(&path, &targets, &Device::Cpu).unwrap();
    assert_eq!(
        (a.format(), a.alpha(), a.modules()[0].alpha_scale),
        (LoraFormat::Peft, Some(2.0), 0.5)
    );

    let raw: Tensors = peft
        .iter()
        .map(|(k, t)| (k.replacen("unet.", "base_model.model.", 1), t.clone()))
        .collect();
    write(&path, &raw, &[]);
    let a = LoraAdapter::from_file(&path, &targets, &Device::Cpu).unwrap();
    assert_eq!(
        (a.format(), a.alpha(), a.modules()[0].alpha_scale),
        (LoraFormat::Peft, None, 1.0)
    );

    // Text encoder modules, stored as f16.
    let te = "text_model.encoder.layers.1.self_attn.q_proj";
    let down = Tensor::ones((4, 32), DType::F16, &Device::Cpu).unwrap();
    let up = Tensor::ones((32, 4), DType::F16, &Device::Cpu).unwrap();
    let alpha = Tensor::new(&[8f32], &Device::Cpu)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let files: [(LoraFormat, Tensors); 2] = [
        (
            LoraFormat::Diffusers,
            Tensors::from([
                (
                    format!("text_encoder.{te}.lora_linear_layer.down.weight"),
                    down.clone(),
                ),
                (
                    format!("text_encoder.{te}.lora_linear_layer.up.weight"),
                    up.clone(),
                ),
            ]),
        ),
        (
            LoraFormat::Kohya,
            Tensors::from([
                (
                    "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight".into(),
                    down,
                ),
                (
                    "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight".into(),
                    up,
                ),
                (
                    "lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha".into(),
                    alpha,
                ),
            ]),
        ),
    ];
    for (format, file) in files {
        write(&path, &file, &[]);
        let a = LoraAdapter::from_file(&path, &targets, &Device::Cpu).unwrap();
        let m = &a.modules()[0];
        assert_eq!(
            (a.format(), m.component, m.path.as_str(), m.update.tensors()[0].dtype()),
            (format, Component::TextEncoder, te, DType::F32)
        );
        assert_eq!(a.target_modules(), ["q_proj"]);
        let mut lora = PipelineLora::default();
        a.add_to(0.5, &mut lora);
        assert!(lora.unet.is_empty());
        assert_eq!(lora.text_encoder.get(te).len(), 1);
    }
}

/// The error message of loading `tensors` written to a file.
fn error_of(tensors: &Tensors) -> String {
    let tmp = TempDir::new("lora-files");
    let path = tmp.0.join("bad.safetensors");
    write(&path, tensors, &[]);
    let err = LoraAdapter::from_file(&path, &targets(), &Device::Cpu).unwrap_err();
    format!("{err:#}")
}

#[test]
fn invalid_adapters_name_the_offending_keys() {
    let probe = tensors("probe_diffusers.safetensors");
    let down_key = format!("unet.{Q}.lora.down.weight");
    let up_key = format!("unet.{Q}.lora.up.weight");

    let mut t = probe.clone();
    t.insert(
        "foo.bar".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    let msg = error_of(&t);
    assert!(
        msg.contains("foo.bar") && msg.contains("unrecognised"),
        "{msg}"
    );

    let mut t = probe.clone();
    let missing =
        "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight";
    t.insert(missing.into(), probe[&down_key].clone());
    let msg = error_of(&t);
    assert!(
        msg.contains(missing) && msg.contains("not in the base model"),
        "{msg}"
    );

    let mut t = probe.clone();
    t.insert(
        down_key.clone(),
        Tensor::zeros((4, 33), DType::F32, &Device::Cpu).unwrap(),
    );
    let msg = error_of(&t);
    assert!(msg.contains(&down_key) && msg.contains("[4, 33]"), "{msg}");

    let mut t = probe.clone();
    t.remove(&up_key);
    let msg = error_of(&t);
    assert!(
        msg.contains(&down_key) && msg.contains("missing up"),
        "{msg}"
    );

    let mut t = probe.clone();
    t.insert(
        format!("lora_unet_{}.lora_down.weight", Q.replace('.', "_")),
        probe[&down_key].clone(),
    );
    t.insert(
        format!("lora_unet_{}.lora_up.weight", Q.replace('.', "_")),
        probe[&up_key].clone(),
    );
    let msg = error_of(&t);
    assert!(msg.contains("mixed"), "{msg}");

    let mut t = probe.clone();
    let twin = format!("unet.{Q}.lora_linear_layer.down.weight");
    t.insert(twin.clone(), probe[&down_key].clone());
    let msg = error_of(&t);
    assert!(msg.contains(&twin) && msg.contains("twice"), "{msg}");

    let msg = error_of(&Tensors::new());
    assert!(msg.contains("no LoRA modules"), "{msg}");
}

#[test]
fn corrupt_files_are_errors() {
    let tmp = TempDir::new("lora-files");
    let targets = targets();
    let bytes = std::fs::read(lora_path("probe_diffusers.safetensors")).unwrap();
    for (name, bytes) in [
        ("truncated", &bytes[..bytes.len() - 10]),
        ("empty", &[][..]),
        ("garbage", &b"not a safetensors file"[..]),
    ] {
        let path = tmp.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = LoraAdapter::from_file(&path, &targets, &Device::Cpu).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a valid safetensors file"),
            "{name}: {err:#}"
        );
    }
    let unet = tmp.0.join("truncated");
    let te = common::fixture_dir().join("text_encoder/model.safetensors");
    assert!(LoraTargets::from_files(&unet, &te).is_err());
}

#[test]
fn convolution_modules() {
    let tmp = TempDir::new("lora-files");
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let file = Tensors::from([
        (
            "lora_unet_conv_in.lora_down.weight".to_string(),
            zeros(&[2, 4, 3, 3]),
        ),
        (
            "lora_unet_conv_in.lora_up.weight".to_string(),
            zeros(&[32, 2, 1, 1]),
        ),
        (format!("{proj_in}.lora_down.weight"), zeros(&[2, 32])),
        (format!("{proj_in}.lora_up.weight"), zeros(&[32, 2])),
    ]);
    let path = tmp.0.join("locon.safetensors");
    write(&path, &file, &[]);
    let a = LoraAdapter::from_file(&path, &targets(), &Device::Cpu).unwrap();
    assert_eq!(a.target_modules(), ["conv_in", "proj_in"]);
    assert_eq!(a.num_params(), 2 * 4 * 9 + 32 * 2 + 2 * 32 + 32 * 2);

    let mut bad = file.clone();
    bad.insert("lora_unet_conv_in.lora_down.weight".into(), zeros(&[2, 4]));
    let msg = error_of(&bad);
    assert!(
        msg.contains("lora_unet_conv_in.lora_down.weight [2, 4]"),
        "{msg}"
    );
}

/// `tensors` with `key` replaced by `f(tensor)`.
fn with(tensors: &Tensors, key: &str, f: impl Fn(&Tensor) -> Tensor) -> Tensors {
    let mut t = tensors.clone();
    let new = f(&t[key]);
    t.insert(key.to_string(), new);
    t
}

#[test]
fn non_finite_and_absurd_values_are_rejected() {
    let probe = tensors("probe_kohya.safetensors");
    let module = format!("lora_unet_{}", Q.replace('.', "_"));
    let (up, alpha) = (format!("{module}.lora_up.weight"), format!("{module}.alpha"));
    let set = |t: &Tensor, v: f32| {
        let mut data = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        data[3] = v;
        Tensor::from_vec(data, t.shape(), &Device::Cpu).unwrap()
    };
    for (what, bad, expect) in [
        ("NaN", with(&probe, &up, |t| set(t, f32::NAN)), "non-finite"),
        ("Inf", with(&probe, &up, |t| set(t, f32::NEG_INFINITY)), "non-finite"),
        ("1e30", with(&probe, &up, |t| set(t, 1e30)), "beyond ±65504"),
        ("alpha inf", with(&probe, &alpha, |_| Tensor::new(f32::INFINITY, &Device::Cpu).unwrap()), "non-finite"),
        ("alpha 1e308", with(&probe, &alpha, |_| Tensor::new(1e308f64, &Device::Cpu).unwrap()), "beyond ±65504"),
        ("weights 3e4", with(&probe, &up, |t| (t.ones_like().unwrap() * 3e4).unwrap()), "too large"),
        ("f16 NaN", with(&probe, &up, |t| set(t, f32::NAN).to_dtype(DType::F16).unwrap()), "non-finite"),
    ] {
        let msg = error_of(&bad);
        assert!(msg.contains(expect) && (msg.contains(&module) || msg.contains(Q)), "{what}: {msg}");
    }

    let tmp = TempDir::new("lora-files");
    let path = tmp.0.join("metadata.safetensors");
    write(&path, &tensors("probe_diffusers.safetensors"), &[("lora_adapter_metadata", r#"{"lora_alpha": 1e308}"#)]);
    let err = LoraAdapter::from_file(&path, &targets(), &Device::Cpu).unwrap_err();
    assert!(format!("{err:#}").contains("lora_alpha"), "{err:#}");
}

#[test]
fn invalid_lycoris_files_name_the_problem() {
    let loha = tensors("loha_kohya.safetensors");
    let module = format!("lora_unet_{}", Q.replace('.', "_"));
    let mut t = loha.clone();
    t.remove(&format!("{module}.hada_w2_b"));
    let msg = error_of(&t);
    assert!(msg.contains("do not fit") && msg.contains(&format!("{module}.hada_w2_a")), "{msg}");

    let mut t = loha.clone();
    t.insert(format!("{module}.lora_down.weight"), Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap());
    let msg = error_of(&t);
    assert!(msg.contains("different kinds"), "{msg}");

    let mut t = loha.clone();
    t.insert(format!("{module}.dora_scale"), Tensor::ones((7, 1), DType::F32, &Device::Cpu).unwrap());
    let msg = error_of(&t);
    assert!(msg.contains("DoRA magnitudes that do not fit") && msg.contains("[7, 1]"), "{msg}");

    let mut t = loha.clone();
    t.insert(format!("{module}.w_norm"), Tensor::ones(32, DType::F32, &Device::Cpu).unwrap());
    let msg = error_of(&t);
    assert!(msg.contains("unrecognised") && msg.contains("w_norm"), "{msg}");
}

fn sdxl_targets() -> LoraTargets {
    let dir = common::sdxl_fixture_dir();
    LoraTargets::from_files(&dir.join("unet/diffusion_pytorch_model.safetensors"), &dir.join("text_encoder/model.safetensors"))
        .unwrap()
        .with_text_encoder_2(&dir.join("text_encoder_2/model.safetensors"))
        .unwrap()
}

/// Every module's `scale · up · down`, keyed by component and path.
fn all_deltas(a: &LoraAdapter) -> BTreeMap<(Component, String), Tensor> {
    let mut lora = PipelineLora::default();
    a.add_to(0.8, &mut lora);
    a.modules().iter().map(|m| ((m.component, m.path.clone()), delta_weight(&lora, m.component, &m.path))).collect()
}

fn assert_same_deltas(a: &LoraAdapter, b: &LoraAdapter) {
    let (a, b) = (all_deltas(a), all_deltas(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, d) in &a {
        assert!(max_abs_diff(d, &b[k]) < 1e-6, "{k:?}");
    }
}

#[test]
fn sdxl_files_cover_the_unet_and_both_text_encoders() {
    let dir = common::sdxl_fixture_dir().join("loras");
    let targets = sdxl_targets();
    let diffusers = LoraAdapter::from_file(&dir.join("probe_diffusers.safetensors"), &targets, &Device::Cpu).unwrap();
    let kohya = LoraAdapter::from_file(&dir.join("probe_kohya.safetensors"), &targets, &Device::Cpu).unwrap();
    assert_eq!((diffusers.format(), kohya.format()), (LoraFormat::Diffusers, LoraFormat::Kohya));
    let count = |a: &LoraAdapter, c: Component| a.modules().iter().filter(|m| m.component == c).count();
    for a in [&diffusers, &kohya] {
        // 3 layers × q/k/v/out per text encoder; the second's paths keep `text_model.`.
        assert_eq!((count(a, Component::TextEncoder), count(a, Component::TextEncoder2)), (12, 12));
        assert_eq!(count(a, Component::Unet), 96);
        assert!(a.modules().iter().filter(|m| m.component != Component::Unet).all(|m| m.path.starts_with("text_model.encoder.layers.")));
    }
    assert_same_deltas(&diffusers, &kohya);

    // sd-scripts' SDXL naming (`lora_unet_input_blocks_4_1_…`), on every UNet linear and conv.
    let sgm = LoraAdapter::from_file(&dir.join("locon_sgm_kohya.safetensors"), &targets, &Device::Cpu).unwrap();
    assert_eq!((sgm.format(), sgm.num_modules()), (LoraFormat::Kohya, targets.modules(Component::Unet).count()));
    assert!(sgm.modules().iter().any(|m| m.path == "up_blocks.0.upsamplers.0.conv" && m.update.tensors()[0].dims() == [4, 64, 3, 3]));

    // An SDXL adapter on an SD 1.x model: the second text encoder's keys are named.
    let err = LoraAdapter::from_file(&dir.join("probe_diffusers.safetensors"), &self::targets(), &Device::Cpu).unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("keys for text_encoder_2, which this model does not have (an SDXL adapter on an SD 1.x/2.x model?) (24)"), "{err}");
}

#[test]
fn text_encoder_key_forms_give_the_same_deltas() {
    // SD 1.x: transformers 5 keys (no `text_model.`), kohya `lora_te_text_model_…`, and the
    // transformers 4 form with `text_model.` written out.
    let five = load("te_probe_diffusers.safetensors");
    assert!(tensors("te_probe_diffusers.safetensors").keys().any(|k| k.starts_with("text_encoder.encoder.layers.")));
    assert!(five.modules().iter().any(|m| m.component == Component::TextEncoder && m.path.starts_with("text_model.")));
    assert_same_deltas(&five, &load("te_probe_kohya.safetensors"));
    let tmp = TempDir::new("lora-files");
    let four: Tensors = tensors("te_probe_diffusers.safetensors")
        .into_iter()
        .map(|(k, t)| (k.replacen("text_encoder.", "text_encoder.text_model.", 1), t))
        .collect();
    let path = tmp.0.join("four.safetensors");
    write(&path, &four, &[]);
    assert_same_deltas(&five, &LoraAdapter::from_file(&path, &targets(), &Device::Cpu).unwrap());
    // kohya without `text_model_` resolves too.
    let short: Tensors = tensors("te_probe_kohya.safetensors")
        .into_iter()
        .map(|(k, t)| (k.replacen("lora_te_text_model_", "lora_te_", 1), t))
        .collect();
    write(&path, &short, &[]);
    assert_same_deltas(&five, &LoraAdapter::from_file(&path, &targets(), &Device::Cpu).unwrap());
}
