//! The HTTP API against a real server on a loopback port: system endpoints, the OpenAI
//! generation endpoint, validation errors, auth, the queue (429) and the job API (cancel,
//! events). Small images (32×32, 64×64) and few steps keep it fast.

mod server_support;

use std::io::{BufRead, BufReader};

use reqwest::StatusCode;
use serde_json::{json, Value};
use server_support::{assert_error, decode_image, start};

#[test]
fn openapi_json_is_up_to_date() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = sdserve::server::openapi::spec_json();
    assert!(
        committed == generated,
        "openapi/openapi.json is stale: regenerate it with `cargo run -- openapi > openapi/openapi.json`"
    );
    // Precise enough for client generators: enums, nullables, the shared error schema.
    let spec: Value = serde_json::from_str(&generated).unwrap();
    let schemas = &spec["components"]["schemas"];
    assert_eq!(
        schemas["JobStatus"]["enum"],
        json!(["queued", "running", "succeeded", "failed", "cancelled"])
    );
    assert!(schemas["SchedulerName"]["enum"]
        .as_array()
        .unwrap()
        .contains(&json!("dpmpp_2m_karras")));
    assert!(schemas["ErrorObject"]["properties"]["param"]["type"]
        .as_array()
        .unwrap()
        .contains(&json!("null")));
    let job_post = &spec["paths"]["/v1/images/jobs"]["post"]["responses"];
    for code in ["202", "400", "404", "429"] {
        assert!(
            job_post.get(code).is_some(),
            "POST /v1/images/jobs documents {code}"
        );
    }
    assert!(
        spec["paths"]["/v1/images/jobs/{id}/cancel"]["post"]["responses"]
            .get("409")
            .is_some()
    );
}

#[test]
fn system_endpoints() {
    let s = start(|_| {});
    let health: Value = s.get("/health").json().unwrap();
    assert_eq!(health["status"], "ok");
    let ready = s.get("/ready");
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(ready.json::<Value>().unwrap()["status"], "ready");

    let models: Value = s.get("/v1/models").json().unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny-sd1");
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["family"], "sd1");
    assert_eq!(s.get("/v1/models/tiny-sd1").status(), StatusCode::OK);
    assert_error(s.get("/v1/models/dall-e-3"), StatusCode::NOT_FOUND);

    let spec = s.get("/openapi.json").text().unwrap();
    assert_eq!(spec, sdserve::server::openapi::spec_json());
    let docs = s.get("/docs");
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().unwrap().to_lowercase().contains("redoc"));

    let err = assert_error(s.get("/v1/nothing-here"), StatusCode::NOT_FOUND);
    assert_eq!(err["type"], "not_found_error");
    assert_error(s.delete("/v1/models"), StatusCode::METHOD_NOT_ALLOWED);

    // Generate once (and miss an adapter) so that the metrics have something to show.
    s.generate(
        json!({"prompt": "a circle", "size": "32x32", "steps": 1, "seed": 3,
        "loras": [{"name": "probe_diffusers"}]}),
    );
    let metrics = s.get("/metrics");
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = metrics.text().unwrap();
    for name in [
        "sdserve_http_requests_total",
        "sdserve_http_request_duration_seconds_bucket",
        "sdserve_generation_seconds_bucket",
        "sdserve_queue_depth",
        "sdserve_adapter_cache_misses_total",
        "sdserve_adapter_load_seconds_bucket",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
    assert!(
        text.contains("route=\"/v1/images/generations\""),
        "requests are labelled by route template"
    );
}

#[test]
fn openai_generation_returns_pngs_seeds_and_parameters() {
    let s = start(|_| {});
    // Random seed, OpenAI-only fields accepted and ignored.
    let r = s.generate(json!({
        "model": "whatever", "prompt": "two red circles", "size": "64x64", "n": 1,
        "response_format": "b64_json", "quality": "high", "style": "vivid", "user": "u1",
        "background": "auto", "moderation": "low", "steps": 2
    }));
    assert!(r["created"].as_u64().unwrap() > 0);
    assert_eq!(r["output_format"], "png");
    assert_eq!(r["size"], "64x64");
    let img = &r["data"][0];
    assert_eq!(
        decode_image(img["b64_json"].as_str().unwrap()),
        (image::ImageFormat::Png, 64, 64)
    );
    let seed = img["seed"].as_u64().expect("the seed used is returned");
    let p = &r["parameters"];
    assert_eq!(p["seed"].as_u64(), Some(seed));
    assert_eq!(p["steps"], 2);
    assert_eq!(p["model"], "tiny-sd1");
    assert_eq!(p["scheduler"], "ddim");
    assert_eq!(p["width"], 64);
    assert_eq!(p["loras"], json!([]));

    // The returned seed reproduces the image exactly.
    let again =
        s.generate(json!({"prompt": "two red circles", "size": "64x64", "steps": 2, "seed": seed}));
    assert_eq!(again["data"][0]["b64_json"], img["b64_json"]);

    // n = 2: seeds s, s+1; image 2 equals a single request with seed s+1.
    let two = s.generate(
        json!({"prompt": "a square", "size": "32x32", "steps": 2, "seed": 10, "n": 2,
        "guidance_scale": 3.0, "negative_prompt": "blur", "scheduler": "euler_a"}),
    );
    let data = two["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["seed"], 10);
    assert_eq!(data[1]["seed"], 11);
    assert_eq!(two["parameters"]["seeds"], json!([10, 11]));
    assert_ne!(data[0]["b64_json"], data[1]["b64_json"]);
    let single = s.image_b64(
        json!({"prompt": "a square", "size": "32x32", "steps": 2, "seed": 11,
        "guidance_scale": 3.0, "negative_prompt": "blur", "scheduler": "euler_a"}),
    );
    assert_eq!(data[1]["b64_json"].as_str().unwrap(), single);

    // Seed -1 means random.
    let random = s.generate(json!({"prompt": "x", "size": "32x32", "steps": 1, "seed": -1}));
    assert!(random["data"][0]["seed"].as_u64().unwrap() < (1u64 << 53));

    // Other output formats.
    for (fmt, expected) in [
        ("jpeg", image::ImageFormat::Jpeg),
        ("webp", image::ImageFormat::WebP),
    ] {
        let r = s.generate(
            json!({"prompt": "x", "size": "32x32", "steps": 1, "seed": 1,
            "output_format": fmt, "output_compression": 80}),
        );
        assert_eq!(r["output_format"], fmt);
        assert_eq!(
            decode_image(r["data"][0]["b64_json"].as_str().unwrap()),
            (expected, 32, 32)
        );
    }
    // Every scheduler runs.
    for sched in ["ddim", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"] {
        let r = s.generate(
            json!({"prompt": "x", "size": "32x32", "steps": 2, "seed": 1, "scheduler": sched}),
        );
        assert_eq!(r["parameters"]["scheduler"], sched);
    }
}

#[test]
fn invalid_requests_get_error_bodies() {
    let s = start(|_| {});
    let gen = "/v1/images/generations";
    let bad = StatusCode::BAD_REQUEST;

    let e = assert_error(s.post_raw(gen, "{\"prompt\": \"x\", "), bad);
    assert_eq!(e["type"], "invalid_request_error");
    assert_eq!(e["code"], "invalid_json");
    assert_error(s.post_raw(gen, ""), bad);
    assert_error(s.post_raw(gen, "[1, 2]"), bad);
    let e = assert_error(s.post_json(gen, &json!({"prompt": "x", "n": "2"})), bad);
    assert_eq!(e["param"], "n");
    let e = assert_error(s.post_json(gen, &json!({"size": "32x32"})), bad);
    assert!(e["message"].as_str().unwrap().contains("prompt"), "{e}");

    let cases: Vec<(Value, &str)> = vec![
        (json!({"prompt": "x", "steps": 0}), "steps"),
        (json!({"prompt": "x", "steps": 10000}), "steps"),
        (json!({"prompt": "x", "steps": 151}), "steps"),
        (json!({"prompt": "x", "steps": -3}), "steps"),
        (json!({"prompt": "x", "size": "7x7"}), "size"),
        (json!({"prompt": "x", "size": "30x30"}), "size"),
        (json!({"prompt": "x", "size": "0x64"}), "size"),
        (json!({"prompt": "x", "size": "4096x4096"}), "size"),
        (json!({"prompt": "x", "size": "big"}), "size"),
        (json!({"prompt": "x", "n": 100}), "n"),
        (json!({"prompt": "x", "n": 0}), "n"),
        (
            json!({"prompt": "x", "guidance_scale": 1000}),
            "guidance_scale",
        ),
        (json!({"prompt": "x", "eta": 2}), "eta"),
        (json!({"prompt": "x", "seed": -5}), "seed"),
        (json!({"prompt": "x", "scheduler": "plms"}), "scheduler"),
        (
            json!({"prompt": "x", "output_format": "gif"}),
            "output_format",
        ),
        (
            json!({"prompt": "x", "output_compression": 300}),
            "output_compression",
        ),
        (
            json!({"prompt": "x", "response_format": "url"}),
            "response_format",
        ),
        (json!({"prompt": "x", "stream": true}), "stream"),
        (json!({"prompt": "word ".repeat(200)}), "prompt"),
        (
            json!({"prompt": "x", "loras": [{"name": "probe_diffusers", "weight": 100}]}),
            "loras[0].weight",
        ),
        (
            json!({"prompt": "x", "loras": [{"name": "../etc/passwd"}]}),
            "loras[0].name",
        ),
        (json!({"prompt": "x", "loras": [{"weight": 1}]}), "loras[0]"),
    ];
    for (body, param) in cases {
        let e = assert_error(s.post_json(gen, &body), bad);
        let got = e["param"].as_str().unwrap_or_default();
        assert!(
            got.starts_with(param),
            "{body}: expected param {param}, got {e}"
        );
    }
    // Also through the job API.
    assert_error(
        s.post_json("/v1/images/jobs", &json!({"prompt": "x", "steps": 0})),
        bad,
    );

    let e = assert_error(
        s.post_json(
            gen,
            &json!({"prompt": "x", "size": "32x32", "loras": [{"name": "no_such_adapter"}]}),
        ),
        StatusCode::NOT_FOUND,
    );
    assert_eq!(e["code"], "adapter_not_found");
    assert_eq!(e["param"], "loras[0].name");
    assert_error(s.get("/v1/images/jobs/nope"), StatusCode::NOT_FOUND);
    assert_error(
        s.post_json("/v1/images/jobs/nope/cancel", &json!({})),
        StatusCode::NOT_FOUND,
    );
    assert_error(s.get("/v1/images/jobs/nope/events"), StatusCode::NOT_FOUND);

    s.assert_still_serving();
}

#[test]
fn api_key_is_required_except_on_probes() {
    let s = start(|c| c.api_key = Some("sekret".into()));
    let plain = reqwest::blocking::Client::new();
    for path in ["/health", "/ready", "/metrics", "/openapi.json"] {
        assert_eq!(
            plain.get(s.url(path)).send().unwrap().status(),
            StatusCode::OK,
            "{path} is exempt"
        );
    }
    let e = assert_error(
        plain.get(s.url("/v1/models")).send().unwrap(),
        StatusCode::UNAUTHORIZED,
    );
    assert_eq!(e["type"], "authentication_error");
    assert_error(
        plain
            .get(s.url("/v1/models"))
            .bearer_auth("wrong")
            .send()
            .unwrap(),
        StatusCode::UNAUTHORIZED,
    );
    assert_error(
        plain
            .post(s.url("/v1/images/generations"))
            .json(&json!({"prompt": "x"}))
            .send()
            .unwrap(),
        StatusCode::UNAUTHORIZED,
    );
    assert_error(
        plain.get(s.url("/v1/adapters")).send().unwrap(),
        StatusCode::UNAUTHORIZED,
    );
    // The helper client sends the key.
    assert_eq!(s.get("/v1/models").status(), StatusCode::OK);
    s.assert_still_serving();
}

#[test]
fn cors_preflight_is_answered_when_configured() {
    let s = start(|c| {
        c.cors_origins = vec!["https://app.example".into()];
        c.api_key = Some("k".into());
    });
    let resp = reqwest::blocking::Client::new()
        .request(reqwest::Method::OPTIONS, s.url("/v1/images/generations"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.example"
    );
}

/// A job that runs long enough to be observed and cancelled (it is always cancelled).
fn slow_job() -> Value {
    json!({"prompt": "slow", "size": "64x64", "steps": SLOW_STEPS, "seed": 5})
}

/// Far more than the tests wait for (the job is always cancelled); below the fixture's 1000
/// training timesteps.
const SLOW_STEPS: u32 = 500;

#[test]
fn queue_full_gives_429_and_cancel_semantics() {
    let s = start(|c| {
        c.queue_capacity = 1;
        c.workers = 1;
        c.limits.max_steps = SLOW_STEPS;
    });
    let a = s.submit(slow_job());
    let a_id = a["id"].as_str().unwrap().to_string();
    assert_eq!(a["object"], "image.job");
    assert_eq!(a["poll_url"], format!("/v1/images/jobs/{a_id}"));
    s.wait_job(&a_id, "running", |j| j["status"] == "running");

    // B waits in the one queue slot; C finds the queue full.
    let b = s.submit(json!({"prompt": "queued", "size": "32x32", "steps": 2, "seed": 1}));
    let b_id = b["id"].as_str().unwrap().to_string();
    assert_eq!(b["status"], "queued");
    assert_eq!(b["queue_position"], 1);
    let e = assert_error(
        s.post_json("/v1/images/jobs", &slow_job()),
        StatusCode::TOO_MANY_REQUESTS,
    );
    assert_eq!(e["type"], "rate_limit_error");
    assert_eq!(e["code"], "queue_full");
    assert_error(
        s.post_json(
            "/v1/images/generations",
            &json!({"prompt": "x", "size": "32x32", "steps": 1}),
        ),
        StatusCode::TOO_MANY_REQUESTS,
    );
    let ready: Value = s.get("/ready").json().unwrap();
    assert_eq!(ready["queue_depth"], 1);
    assert_eq!(ready["running"], 1);

    // Cancelling a queued job is immediate.
    let cancelled: Value = s
        .post_json(&format!("/v1/images/jobs/{b_id}/cancel"), &json!({}))
        .json()
        .unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    let b = s.job(&b_id);
    assert_eq!(b["status"], "cancelled");
    assert_eq!(b["error"]["code"], "cancelled");
    assert!(b["result"].is_null());
    // Cancelling a finished job is a conflict.
    let e = assert_error(
        s.post_json(&format!("/v1/images/jobs/{b_id}/cancel"), &json!({})),
        StatusCode::CONFLICT,
    );
    assert_eq!(e["type"], "conflict_error");

    // A running job stops at its next step.
    let a = s.wait_job(&a_id, "past step 1", |j| {
        j["progress"]["step"].as_u64().unwrap() >= 1
    });
    assert_eq!(a["progress"]["total_steps"], SLOW_STEPS);
    let resp: Value = s
        .post_json(&format!("/v1/images/jobs/{a_id}/cancel"), &json!({}))
        .json()
        .unwrap();
    assert!(
        resp["status"] == "cancelled" || resp["cancel_requested"] == true,
        "{resp}"
    );
    let a = s.wait_terminal(&a_id);
    assert_eq!(a["status"], "cancelled");
    assert!(
        a["progress"]["step"].as_u64().unwrap() < SLOW_STEPS as u64,
        "stopped early: {}",
        a["progress"]
    );
    assert!(a["finished_at"].as_u64().is_some());
    assert_error(
        s.post_json(&format!("/v1/images/jobs/{a_id}/cancel"), &json!({})),
        StatusCode::CONFLICT,
    );

    // The queue drained: submissions are accepted again and succeed.
    let c = s.submit(json!({"prompt": "after", "size": "32x32", "steps": 2, "seed": 2}));
    let c = s.wait_terminal(c["id"].as_str().unwrap());
    assert_eq!(c["status"], "succeeded");
    assert_eq!(c["progress"]["fraction"], 1.0);
    assert_eq!(
        decode_image(c["result"]["data"][0]["b64_json"].as_str().unwrap()).1,
        32
    );
    assert_eq!(c["result"]["data"][0]["seed"], 2);
}

/// Reads server-sent events until the stream ends: `(event, data)` pairs.
fn read_events(resp: reqwest::blocking::Response) -> Vec<(String, Value)> {
    let mut events = Vec::new();
    let mut name = String::new();
    let mut data = String::new();
    for line in BufReader::new(resp).lines() {
        let line = line.unwrap();
        if let Some(v) = line.strip_prefix("event:") {
            name = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        } else if line.is_empty() && !data.is_empty() {
            events.push((
                std::mem::take(&mut name),
                serde_json::from_str(&std::mem::take(&mut data)).unwrap(),
            ));
        }
    }
    events
}

#[test]
fn job_events_stream_progress_until_done() {
    let s = start(|c| c.limits.max_steps = SLOW_STEPS);
    // Hold the worker so that the observed job starts queued.
    let blocker = s.submit(slow_job());
    let blocker_id = blocker["id"].as_str().unwrap().to_string();
    s.wait_job(&blocker_id, "running", |j| j["status"] == "running");
    let job =
        s.submit(json!({"prompt": "watched", "size": "64x64", "steps": 6, "seed": 9, "n": 2}));
    let id = job["id"].as_str().unwrap().to_string();
    let events = s.get(&format!("/v1/images/jobs/{id}/events"));
    assert_eq!(events.status(), StatusCode::OK);
    assert!(events.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    s.post_json(&format!("/v1/images/jobs/{blocker_id}/cancel"), &json!({}));

    let events = read_events(events);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"queued"), "{names:?}");
    assert_eq!(names.last(), Some(&"succeeded"), "{names:?}");
    assert!(names.contains(&"progress"), "{names:?}");
    let steps: Vec<u64> = events
        .iter()
        .filter(|(n, _)| n == "progress")
        .map(|(_, d)| d["progress"]["step"].as_u64().unwrap())
        .collect();
    assert!(
        steps.windows(2).all(|w| w[0] <= w[1]),
        "progress is monotonic: {steps:?}"
    );
    let (_, last) = events.last().unwrap();
    assert_eq!(last["id"], id.as_str());
    assert_eq!(last["progress"]["total_steps"], 12);
    assert_eq!(last["result"]["data"].as_array().unwrap().len(), 2);

    // A finished job's stream is its one terminal event.
    let again = read_events(s.get(&format!("/v1/images/jobs/{id}/events")));
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].0, "succeeded");
}

#[test]
fn sync_request_is_cancelled_when_the_client_goes_away() {
    let s = start(|c| c.limits.max_steps = SLOW_STEPS);
    let impatient = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_millis(800))
        .build()
        .unwrap();
    let err = impatient
        .post(s.url("/v1/images/generations"))
        .json(&slow_job())
        .send();
    assert!(err.is_err(), "the slow request outlives the client timeout");
    // The abandoned job stops instead of running its thousands of steps.
    let start = std::time::Instant::now();
    loop {
        let ready: Value = s.get("/ready").json().unwrap();
        if ready["running"] == 0 && ready["queue_depth"] == 0 {
            break;
        }
        assert!(
            start.elapsed().as_secs() < 120,
            "the abandoned job is still running: {ready}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    s.assert_still_serving();
}

#[test]
fn ready_is_503_until_the_model_loads() {
    use axum::body::Body;
    use axum::http::Request;
    use sdserve::server::{AppState, ModelStatus, ServerConfig};
    use tower::ServiceExt;

    let root = std::env::temp_dir().join(format!("sdserve-test-{}", uuid::Uuid::new_v4().simple()));
    let mut config = ServerConfig::for_model(server_support::fixture_dir());
    config.adapters_dir = root.join("adapters");
    config.data_dir = root.join("data");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // State without the loading thread: the model stays `Loading` until set by hand.
    let state = runtime.block_on(AppState::new(config)).unwrap();
    let app = sdserve::server::routes::app(state.clone()).unwrap();
    let call = |req: Request<Body>| {
        let app = app.clone();
        async move {
            let resp = app.oneshot(req).await.unwrap();
            let status = resp.status();
            let retry = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            (
                status,
                retry,
                serde_json::from_slice::<Value>(&body).unwrap(),
            )
        }
    };
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    runtime.block_on(async {
        assert_eq!(call(get("/health")).await.0, StatusCode::OK);
        let (status, _, body) = call(get("/ready")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "loading");
        let gen = Request::post("/v1/images/generations")
            .body(Body::from(r#"{"prompt": "x"}"#))
            .unwrap();
        let (status, retry, body) = call(gen).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(retry.is_some(), "Retry-After while loading");
        assert_eq!(body["error"]["type"], "service_unavailable_error");

        state
            .model
            .set(ModelStatus::Failed("weights missing".into()));
        let (status, _, body) = call(get("/ready")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "failed");
        assert_eq!(body["error"], "weights missing");
    });
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn finished_jobs_are_kept_up_to_the_history_bound() {
    let s = start(|c| c.job_history = 2);
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let job = s.submit(json!({"prompt": "x", "size": "32x32", "steps": 1, "seed": i}));
            let id = job["id"].as_str().unwrap().to_string();
            s.wait_terminal(&id);
            id
        })
        .collect();
    assert_error(
        s.get(&format!("/v1/images/jobs/{}", ids[0])),
        StatusCode::NOT_FOUND,
    );
    for id in &ids[1..] {
        assert_eq!(s.job(id)["status"], "succeeded");
    }
}

#[test]
fn image_jobs_survive_a_restart() {
    let s = start(|c| {
        c.limits.max_steps = SLOW_STEPS;
        c.stores.lease_timeout_s = Some(1.0);
    });
    let done = s.submit(json!({"prompt": "kept", "size": "32x32", "steps": 2, "seed": 4}));
    let done_id = done["id"].as_str().unwrap().to_string();
    let before = s.wait_terminal(&done_id);
    assert_eq!(before["status"], "succeeded");
    let slow = s.submit(slow_job());
    let slow_id = slow["id"].as_str().unwrap().to_string();
    s.wait_job(&slow_id, "running", |j| j["status"] == "running");

    let s = s.restart();
    // The finished job is read back from the database, result included.
    let after = s.job(&done_id);
    assert_eq!(after["status"], "succeeded");
    assert_eq!(after["result"], before["result"]);
    assert_eq!(after["parameters"], before["parameters"]);
    // The job that was running when its server stopped ends interrupted.
    let start = std::time::Instant::now();
    let slow = loop {
        let j = s.job(&slow_id);
        if j["status"] != "running" && j["status"] != "queued" {
            break j;
        }
        assert!(start.elapsed().as_secs() < 60, "still {j}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(slow["status"], "failed", "{slow}");
    assert_eq!(slow["error"]["code"], "interrupted");
    // Its event stream is one terminal event, and nothing after a resume from it.
    let events = read_events(s.get(&format!("/v1/images/jobs/{slow_id}/events")));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "failed");
    let resumed = s.auth_get_with(&format!("/v1/images/jobs/{done_id}/events"), "last-event-id", "1000000");
    assert!(read_events(resumed).is_empty());
}
