//! The /align job API on a real server over the fixture and the default model: validation, a job whose
//! adapter is listed and makes generations brighter, events (JSON and SSE), cancel, and
//! records that survive a restart.

mod server_support;

use std::io::Read;
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{json, Value};
use server_support::common::terminal;
use server_support::{assert_error, start, TestServer};

fn align_body(name: &str, steps: usize) -> Value {
    server_support::common::align_request(name, steps, 4, 4)
}

fn submit(s: &TestServer, body: &Value) -> Value {
    let resp = s.post_json("/align", body);
    let status = resp.status();
    let text = resp.text().unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn align_job(s: &TestServer, id: &str) -> Value {
    let resp = s.get(&format!("/v1/align/jobs/{id}"));
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().unwrap()
}

fn wait_align(s: &TestServer, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let job = align_job(s, id);
        if pred(&job) {
            return job;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "align job stuck: {job}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Mean pixel value of generated images for fixed seeds, with or without the adapter.
fn brightness(s: &TestServer, lora: Option<&str>) -> f64 {
    let mut total = 0.0;
    for seed in [91_001, 91_002, 91_003] {
        let mut body = json!({"prompt": "two red circles", "size": "32x32", "steps": 4, "guidance_scale": 3.0,
            "scheduler": "ddim", "seed": seed});
        if let Some(name) = lora {
            body["loras"] = json!([{"name": name, "weight": 1.0}]);
        }
        let b64 = s.image_b64(body);
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        total += img.as_raw().iter().map(|&v| v as f64 / 255.0).sum::<f64>() / img.as_raw().len() as f64;
    }
    total / 3.0
}

#[test]
fn align_job_writes_an_adapter_that_the_next_request_uses() {
    // The committed default model: its trained decoder lets brightness move (the fixture's
    // random one keeps the image mean nearly fixed).
    let s = start(|c| c.model = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(sdserve::DEFAULT_MODEL_DIR));
    let rewards: Value = s.get("/v1/align/rewards").json().unwrap();
    assert!(rewards["data"].as_array().unwrap().iter().any(|r| r["name"] == "brightness"));

    let before = brightness(&s, None);
    let job = submit(&s, &align_body("brighter", 6));
    assert_eq!(job["status"], "queued");
    let id = job["id"].as_str().unwrap().to_string();
    let done = wait_align(&s, &id, terminal);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["fine_tuned_adapter"], "brighter");
    assert_eq!(done["metrics"].as_array().unwrap().len(), 6);

    let adapters: Value = s.get("/v1/adapters").json().unwrap();
    let entry = adapters["data"].as_array().unwrap().iter().find(|a| a["name"] == "brighter").cloned().expect("listed");
    assert_eq!(entry["source"], "align_job", "{entry}");
    let sidecar: Value = serde_json::from_slice(&std::fs::read(s.adapters_dir.join("brighter.json")).unwrap()).unwrap();
    assert_eq!(sidecar["job_id"], id.as_str());
    assert_eq!(sidecar["reward_curve"].as_array().unwrap().len(), 6);
    assert_eq!(sidecar["hyperparameters"]["lora_rank"], 4);

    let after = brightness(&s, Some("brighter"));
    println!("brightness over 3 seeds: base {before:.4}, with adapter {after:.4}");
    assert!(after > before + 0.01, "{before} -> {after}");

    // Events: JSON list, then the same as server-sent events (the stream ends with the job).
    let events: Value = s.get(&format!("/v1/align/jobs/{id}/events")).json().unwrap();
    let events = events["data"].as_array().unwrap().clone();
    assert_eq!(events.iter().filter(|e| e["type"] == "metrics").count(), 6);
    assert!(events.iter().all(|e| e["id"].as_u64().is_some()));
    let mut sse = String::new();
    s.client
        .get(s.url(&format!("/v1/align/jobs/{id}/events")))
        .header("accept", "text/event-stream")
        .send()
        .unwrap()
        .read_to_string(&mut sse)
        .unwrap();
    assert_eq!(sse.matches("event: metrics").count(), 6, "{sse}");
    assert!(sse.contains("job succeeded"));

    // A run can continue from an existing adapter; without a size it trains at the model's
    // native size (64×64 for the default model), which the job record names.
    let mut more = align_body("brighter-more", 2);
    more["init_adapter"] = json!("brighter");
    more.as_object_mut().unwrap().retain(|k, _| k != "width" && k != "height");
    let queued = submit(&s, &more);
    assert_eq!((queued["request"]["width"].as_u64(), queued["request"]["height"].as_u64()), (Some(64), Some(64)), "{queued}");
    let cont = wait_align(&s, queued["id"].as_str().unwrap(), terminal);
    assert_eq!(cont["status"], "succeeded", "{cont}");
    let sidecar: Value = serde_json::from_slice(&std::fs::read(s.adapters_dir.join("brighter-more.json")).unwrap()).unwrap();
    assert_eq!(sidecar["hyperparameters"]["init_adapter"], "brighter");
    assert_eq!((sidecar["hyperparameters"]["width"].as_u64(), sidecar["hyperparameters"]["height"].as_u64()), (Some(64), Some(64)));

    // The same name again needs overwrite.
    let err = assert_error(s.post_json("/align", &align_body("brighter", 1)), StatusCode::CONFLICT);
    assert_eq!(err["code"], "adapter_exists");
    s.assert_still_serving();
}

#[test]
fn sdxl_align_job_writes_an_adapter_that_the_next_request_uses() {
    let s = start(|c| c.model = server_support::common::sdxl_fixture_dir());
    let models: Value = s.get("/v1/models").json().unwrap();
    assert_eq!(models["data"][0]["family"], "sdxl");

    // An SDXL adapter (UNet and both text encoders) uploads and draws; an SD 1.x one is refused.
    let probe = std::fs::read(server_support::common::sdxl_fixture_dir().join("loras/probe_diffusers.safetensors")).unwrap();
    assert_eq!(s.put_bytes("/v1/adapters/probe_sdxl", probe).status(), StatusCode::CREATED);
    let request = |lora: Option<&str>| {
        let mut body = json!({"prompt": "two red circles", "size": "32x32", "steps": 4, "guidance_scale": 5.0,
            "scheduler": "euler", "seed": 7});
        if let Some(name) = lora {
            body["loras"] = json!([{"name": name, "weight": 1.0}]);
        }
        body
    };
    let base = s.image_b64(request(None));
    assert_ne!(s.image_b64(request(Some("probe_sdxl"))), base);
    let err = assert_error(s.post_json("/v1/images/generations", &request(Some("probe_diffusers"))), StatusCode::BAD_REQUEST);
    assert!(err["message"].as_str().unwrap().contains("not in the base model"), "{err}");

    // AlignProp on the SDXL UNet's attention, at the model's native size (sample_size 16 × VAE
    // scale 4); the adapter is used by the next request.
    let mut body = align_body("sdxl-brighter", 3);
    body["truncation"] = json!({"k": 2});
    body.as_object_mut().unwrap().retain(|k, _| k != "width" && k != "height");
    let job = submit(&s, &body);
    assert_eq!((job["request"]["width"].as_u64(), job["request"]["height"].as_u64()), (Some(64), Some(64)), "{job}");
    let done = wait_align(&s, job["id"].as_str().unwrap(), terminal);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["metrics"].as_array().unwrap().len(), 3);
    let adapters: Value = s.get("/v1/adapters").json().unwrap();
    let entry = adapters["data"].as_array().unwrap().iter().find(|a| a["name"] == "sdxl-brighter").cloned().expect("listed");
    assert_eq!(entry["source"], "align_job", "{entry}");
    let trained = s.image_b64(request(Some("sdxl-brighter")));
    assert_ne!(trained, base, "the trained adapter must change the image");
    assert_eq!(s.image_b64(request(None)), base, "no adapter after an adapter run must be unchanged");
    s.assert_still_serving();
}

#[test]
fn bad_align_requests_get_clear_errors() {
    let s = start(|_| {});
    let with = |k: &str, v: Value| {
        let mut b = align_body("ok", 1);
        b[k] = v;
        b
    };
    for (body, param) in [
        (with("adapter_name", json!("../escape")), "adapter_name"),
        (with("rewards", json!([{"reward": "nope"}])), "rewards"),
        (with("rewards", json!([])), "rewards"),
        (with("truncation", json!({"k": 9})), "truncation"),
        (with("steps", json!(0)), "steps"),
        (with("learning_rate", json!(0.0)), "learning_rate"),
        (with("prompt_set", json!("shapes")), "prompts"),
        (with("width", json!(40000)), "width"),
        (with("width", json!(33)), "width"),
        // what the trainer's backward pass cannot do: latents the UNet does not halve evenly
        (with("width", json!(60)), "width"),
        (with("height", json!(36)), "height"),
        // longer than the text encoder sees (75 tokens)
        (with("prompts", json!(["a circle", "red ".repeat(80)])), "prompts"),
        (with("negative_prompt", json!("blue ".repeat(76))), "negative_prompt"),
    ] {
        let err = assert_error(s.post_json("/v1/align/jobs", &body), StatusCode::BAD_REQUEST);
        assert_eq!(err["param"], param, "{err}");
    }
    let err = assert_error(s.post_json("/align", &with("init_adapter", json!("missing"))), StatusCode::NOT_FOUND);
    assert_eq!(err["param"], "init_adapter");
    assert_error(s.post_json("/align", &with("surprise", json!(1))), StatusCode::BAD_REQUEST);
    assert_error(s.post_raw("/align", "{not json"), StatusCode::BAD_REQUEST);
    assert_error(s.get("/v1/align/jobs/alignjob-nope"), StatusCode::NOT_FOUND);
    assert_error(s.post_json("/v1/align/jobs/alignjob-nope/cancel", &json!({})), StatusCode::NOT_FOUND);
    let list: Value = s.get("/v1/align/jobs").json().unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    s.assert_still_serving();
}

#[test]
fn cancel_stops_a_running_job_and_records_persist() {
    let s = start(|c| c.stores.lease_timeout_s = Some(2.0));
    let running = submit(&s, &align_body("long", 500));
    let id = running["id"].as_str().unwrap().to_string();
    // A second job waits behind it; cancelling it is immediate.
    let queued = submit(&s, &align_body("later", 2));
    let qid = queued["id"].as_str().unwrap().to_string();
    assert_eq!(align_job(&s, &qid)["queue_position"], 1);
    let c: Value = s.post_json(&format!("/v1/align/jobs/{qid}/cancel"), &json!({})).json().unwrap();
    assert_eq!(c["status"], "cancelled");
    let events: Value = s.get(&format!("/v1/align/jobs/{qid}/events")).json().unwrap();
    assert_eq!(events["data"].as_array().unwrap().last().unwrap()["type"], "cancelled", "{events}");

    wait_align(&s, &id, |j| j["step"].as_u64().unwrap_or(0) >= 1);
    // A job claimed by a trainer that never heartbeats (it died) ends interrupted after the
    // lease timeout; the busy trainer here leaves it to the ghost.
    let state = &s.server.state;
    let ghost_id = s.server.block_on(async {
        let request: sdserve::align::request::AlignRequest = serde_json::from_value(align_body("ghosted", 2)).unwrap();
        let job = state.stores.align.submit(&request, 1).await.unwrap();
        let claimed = state.stores.align.claim("trainer-ghost").await.unwrap().expect("the one queued job");
        assert_eq!(claimed.id, job.id);
        job.id
    });
    let ghosted = wait_align(&s, &ghost_id, terminal);
    assert_eq!(ghosted["status"], "failed", "{ghosted}");
    assert_eq!(ghosted["error"]["code"], "interrupted", "{ghosted}");
    assert!(!s.adapters_dir.join("ghosted.safetensors").exists());

    let resp = s.post_json(&format!("/v1/align/jobs/{id}/cancel"), &json!({}));
    assert_eq!(resp.status(), StatusCode::OK);
    let done = wait_align(&s, &id, terminal);
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(done["step"].as_u64().unwrap() < 500);
    assert!(!s.adapters_dir.join("long.safetensors").exists());
    let err = assert_error(s.post_json(&format!("/v1/align/jobs/{id}/cancel"), &json!({})), StatusCode::CONFLICT);
    assert_eq!(err["code"], "job_finished");
    s.assert_still_serving();

    // Records persist across a restart.
    let s = s.restart();
    assert_eq!(align_job(&s, &id)["status"], "cancelled");
    assert_eq!(align_job(&s, &qid)["status"], "cancelled");
    assert_eq!(align_job(&s, &ghost_id)["error"]["code"], "interrupted");
    let list: Value = s.get("/v1/align/jobs").json().unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 3);
}

#[test]
fn non_finite_loss_fails_the_job_and_the_server_keeps_serving() {
    let s = start(|_| {});
    let mut body = align_body("overflow", 3);
    body["rewards"] = json!([{"reward": "brightness", "weight": 1e300}]);
    let job = submit(&s, &body);
    let done = wait_align(&s, job["id"].as_str().unwrap(), terminal);
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "non_finite", "{done}");
    assert!(done["error"]["message"].as_str().unwrap().contains("non-finite"));
    assert!(!s.adapters_dir.join("overflow.safetensors").exists());
    s.assert_still_serving();
}
