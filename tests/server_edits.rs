//! `POST /v1/images/edits` over HTTP (multipart as the OpenAI SDKs send it): image-to-image and
//! inpainting, extension fields, adapters, the async job form, and bad forms.

mod server_support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use server_support::{assert_error, decode_image, edit_input, start, Part};

const PROMPT: &str = "two red circles and a blue square";

fn ok(resp: reqwest::blocking::Response) -> Value {
    let status = resp.status();
    let text = resp.text().unwrap();
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn image_to_image_and_inpainting() {
    let s = start(|_| {});
    let (init, mask) = (edit_input("init.png"), edit_input("mask.png"));
    let edit = |extra: &[Part]| {
        let mut parts = vec![Part::File("image", "init.png", &init), Part::Text("prompt", PROMPT)];
        parts.extend_from_slice(extra);
        ok(s.post_form("/v1/images/edits", &parts))
    };
    let steps = [Part::Text("steps", "5"), Part::Text("seed", "11"), Part::Text("response_format", "b64_json")];
    let img2img = edit(&steps);
    assert_eq!(img2img["data"].as_array().unwrap().len(), 1);
    let p = &img2img["parameters"];
    assert_eq!((p["size"].as_str(), p["steps"].as_u64(), p["seed"].as_u64()), (Some("64x64"), Some(5), Some(11)));
    assert_eq!(p["edit"]["mode"], "image_to_image");
    assert_eq!(p["edit"]["strength"], 0.8);
    assert_eq!(p["edit"]["image_sha256"].as_str().unwrap().len(), 64);
    assert!(p["edit"]["mask_sha256"].is_null());
    let first = img2img["data"][0]["b64_json"].as_str().unwrap().to_string();
    assert_eq!(decode_image(&first).1, 64);
    assert_eq!(edit(&steps)["data"][0]["b64_json"], first.as_str(), "a seed reproduces an edit");

    // Inpainting, the extension fields, size (resizes the inputs), n and an adapter.
    let inpaint = edit(&[
        Part::File("mask", "mask.png", &mask),
        Part::Text("size", "32x32"),
        Part::Text("n", "2"),
        Part::Text("strength", "0.75"),
        Part::Text("steps", "4"),
        Part::Text("guidance_scale", "5"),
        Part::Text("seed", "3"),
        Part::Text("scheduler", "dpmpp_2m"),
        Part::Text("negative_prompt", "blurry"),
        Part::Text("output_format", "jpeg"),
        Part::Text("loras", r#"[{"name": "probe_diffusers", "weight": 0.7}]"#),
        Part::Text("quality", "high"),
    ]);
    let p = &inpaint["parameters"];
    assert_eq!(p["edit"]["mode"], "inpaint");
    assert_eq!((p["edit"]["strength"].as_f64(), p["size"].as_str(), p["scheduler"].as_str()), (Some(0.75), Some("32x32"), Some("dpmpp_2m")));
    assert_eq!(p["loras"][0]["name"], "probe_diffusers");
    assert_eq!(p["seeds"], json!([3, 4]));
    for image in inpaint["data"].as_array().unwrap() {
        assert_eq!(decode_image(image["b64_json"].as_str().unwrap()), (image::ImageFormat::Jpeg, 32, 32));
    }

    // The OpenAI SDK's extra_body form of adapters and its `image[]` field name.
    let sdk = ok(s.post_form("/v1/images/edits", &[
        Part::File("image[]", "init.png", &init),
        Part::Text("prompt", PROMPT),
        Part::Text("steps", "2"),
        Part::Text("loras[][name]", "probe_diffusers"),
        Part::Text("loras[][name]", "other_diffusers"),
        Part::Text("loras[][weight]", "0.5"),
        Part::Text("loras[][weight]", "-0.5"),
    ]));
    let loras = &sdk["parameters"]["loras"];
    assert_eq!((loras[1]["name"].as_str(), loras[1]["weight"].as_f64()), (Some("other_diffusers"), Some(-0.5)));
    s.assert_still_serving();
}

#[test]
fn edit_jobs_report_progress_over_the_steps_that_run() {
    let s = start(|_| {});
    let init = edit_input("init.png");
    let resp = s.post_form("/v1/images/jobs", &[
        Part::File("image", "init.png", &init),
        Part::Text("prompt", PROMPT),
        Part::Text("steps", "10"),
        Part::Text("strength", "0.5"),
        Part::Text("n", "2"),
    ]);
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let job: Value = resp.json().unwrap();
    assert_eq!(job["progress"]["total_steps"], 10, "two images of 5 steps: {job}");
    let id = job["id"].as_str().unwrap();
    let done = s.wait_terminal(id);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!((done["progress"]["step"].as_u64(), done["progress"]["total_steps"].as_u64()), (Some(10), Some(10)));
    assert_eq!(done["result"]["data"].as_array().unwrap().len(), 2);
    assert_eq!(done["parameters"]["edit"]["mode"], "image_to_image");
    // JSON bodies still submit generations.
    assert!(s.submit(json!({"prompt": PROMPT, "size": "32x32", "steps": 1}))["id"].is_string());
    // The edit's record is in the job store: read back after a restart, edit parameters included.
    let s = s.restart();
    let after = s.job(id);
    assert_eq!((&after["status"], &after["progress"], &after["parameters"]), (&done["status"], &done["progress"], &done["parameters"]));
    assert_eq!(after["result"], done["result"]);
}

#[test]
fn bad_edit_forms_get_clear_errors() {
    let s = start(|c| c.limits.max_image_upload_mb = 1);
    let init = edit_input("init.png");
    let cases: Vec<(Vec<Part>, StatusCode, Option<&str>, &str)> = vec![
        (vec![Part::Text("prompt", PROMPT)], StatusCode::BAD_REQUEST, Some("image"), "no image"),
        (vec![Part::File("image", "x.png", b"not an image"), Part::Text("prompt", PROMPT)], StatusCode::BAD_REQUEST, Some("image"), "not an image file"),
        (vec![Part::File("image", "a.png", &init), Part::File("image", "b.png", &init), Part::Text("prompt", PROMPT)], StatusCode::BAD_REQUEST, Some("image"), "one image"),
        (vec![Part::File("image", "a.png", &init), Part::Text("prompt", PROMPT), Part::Text("strength", "0")], StatusCode::BAD_REQUEST, Some("strength"), "strength"),
        (vec![Part::File("image", "a.png", &init), Part::Text("prompt", PROMPT), Part::Text("steps", "2"), Part::Text("strength", "0.3")], StatusCode::BAD_REQUEST, Some("strength"), "no step"),
        (vec![Part::File("image", "a.png", &init), Part::Text("prompt", PROMPT), Part::Text("n", "two")], StatusCode::BAD_REQUEST, Some("n"), "integer"),
        (vec![Part::File("image", "a.png", &init), Part::Text("prompt", PROMPT), Part::Text("scheduler", "nope")], StatusCode::BAD_REQUEST, Some("scheduler"), "unknown variant"),
        (vec![Part::File("image", "a.png", &init), Part::Text("prompt", PROMPT), Part::Text("loras", "{oops")], StatusCode::BAD_REQUEST, Some("loras"), "JSON array"),
        (vec![Part::File("image", "a.png", &init), Part::Text("prompt", PROMPT), Part::Text("loras[][name]", "a"), Part::Text("loras[][name]", "b"), Part::Text("loras[][weight]", "1")], StatusCode::BAD_REQUEST, Some("loras"), "cannot be paired"),
        (vec![Part::File("image", "a.png", &init), Part::Text("prompt", PROMPT), Part::Text("loras", r#"[{"name": "missing"}]"#)], StatusCode::NOT_FOUND, Some("loras[0].name"), "not found"),
        (vec![Part::File("image", "a.png", &init), Part::File("mask", "m.png", b"garbage"), Part::Text("prompt", PROMPT)], StatusCode::BAD_REQUEST, Some("mask"), "mask"),
        (vec![Part::File("image", "a.png", &init), Part::Text("prompt", PROMPT), Part::Text("size", "7x7")], StatusCode::BAD_REQUEST, Some("size"), "size"),
        (vec![Part::File("image", "a.png", &init), Part::Text("prompt", PROMPT), Part::Text("response_format", "url")], StatusCode::BAD_REQUEST, Some("response_format"), "b64_json"),
        (vec![Part::File("image", "a.png", &init)], StatusCode::BAD_REQUEST, None, "prompt"),
    ];
    for (parts, status, param, text) in cases {
        let err = assert_error(s.post_form("/v1/images/edits", &parts), status);
        assert_eq!(err["param"].as_str(), param, "{err}");
        assert!(err["message"].as_str().unwrap().contains(text), "{text}: {err}");
    }
    // Not multipart at all, and too large a form.
    let err = assert_error(s.post_json("/v1/images/edits", &json!({"prompt": PROMPT})), StatusCode::BAD_REQUEST);
    assert!(err["message"].as_str().unwrap().contains("multipart/form-data"), "{err}");
    let big = vec![0u8; 1024 * 1024 + 32 * 1024];
    assert_error(s.post_form("/v1/images/edits", &[Part::File("image", "a.png", &big), Part::Text("prompt", PROMPT)]), StatusCode::PAYLOAD_TOO_LARGE);
    // An image too large to decode is refused from its header.
    let mut wide = Vec::new();
    image::RgbImage::new(5000, 8).write_to(&mut std::io::Cursor::new(&mut wide), image::ImageFormat::Png).unwrap();
    let err = assert_error(s.post_form("/v1/images/edits", &[Part::File("image", "w.png", &wide), Part::Text("prompt", PROMPT)]), StatusCode::BAD_REQUEST);
    assert!(err["message"].as_str().unwrap().contains("4096"), "{err}");
    s.assert_still_serving();
}

#[test]
fn sdxl_edits_with_sdxl_defaults() {
    let s = start(|c| c.model = server_support::common::sdxl_fixture_dir());
    let (init, mask) = (edit_input("init.png"), edit_input("mask.png"));
    for (mask_part, mode, strength) in [(None, "image_to_image", 0.3), (Some(Part::File("mask", "m.png", &mask)), "inpaint", 0.9999)] {
        let mut parts = vec![Part::File("image", "init.png", &init), Part::Text("prompt", PROMPT), Part::Text("steps", "10")];
        parts.extend(mask_part);
        let r = ok(s.post_form("/v1/images/edits", &parts));
        let edit = &r["parameters"]["edit"];
        assert_eq!((edit["mode"].as_str(), edit["strength"].as_f64()), (Some(mode), Some(strength)), "{r}");
        assert_eq!(decode_image(r["data"][0]["b64_json"].as_str().unwrap()).1, 64);
    }
}
