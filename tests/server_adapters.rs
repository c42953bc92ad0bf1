//! Adapters over HTTP: listing, hot add / use / delete, files dropped into the folder,
//! validation, request isolation under concurrency, and replacing an adapter while a job
//! holds it. Plus an ignored measurement of adapter switch cost and throughput.

mod server_support;

use std::collections::HashMap;

use reqwest::StatusCode;
use serde_json::{json, Value};
use server_support::{assert_error, copy_adapter, fixture_lora, start, FIXTURE_ADAPTERS};

fn req(loras: Value, seed: u64) -> Value {
    json!({"prompt": "two red circles and a blue square", "size": "32x32", "steps": 3,
           "guidance_scale": 7.5, "seed": seed, "loras": loras})
}

#[test]
fn list_and_inspect_adapters() {
    let s = start(|_| {});
    let list: Value = s.get("/v1/adapters").json().unwrap();
    assert_eq!(list["object"], "list");
    let data = list["data"].as_array().unwrap();
    let names: Vec<&str> = data.iter().map(|a| a["name"].as_str().unwrap()).collect();
    for name in FIXTURE_ADAPTERS {
        assert!(names.contains(&name), "{names:?}");
    }
    for a in data {
        assert_eq!(a["object"], "adapter");
        assert_eq!(a["source"], "file");
        assert!(a["error"].is_null(), "{a}");
        assert!(a["rank"].as_u64().unwrap() >= 1, "{a}");
        assert!(!a["target_modules"].as_array().unwrap().is_empty(), "{a}");
        assert_eq!(a["sha256"].as_str().unwrap().len(), 64);
        assert!(a["size_bytes"].as_u64().unwrap() > 0);
        assert!(a["format"].is_string());
    }
    let probe: Value = s.get("/v1/adapters/probe_diffusers").json().unwrap();
    assert_eq!(probe["rank"], 4);
    let other: Value = s.get("/v1/adapters/other_diffusers").json().unwrap();
    assert_eq!(other["rank"], 2);
    let bytes = std::fs::read(fixture_lora("probe_diffusers")).unwrap();
    assert_eq!(probe["size_bytes"], bytes.len() as u64);
    assert_error(s.get("/v1/adapters/missing"), StatusCode::NOT_FOUND);

    // Using an adapter loads it into the cache.
    assert_eq!(probe["loaded"], false);
    s.generate(req(json!([{"name": "probe_diffusers", "weight": 0.5}]), 1));
    let probe: Value = s.get("/v1/adapters/probe_diffusers").json().unwrap();
    assert_eq!(probe["loaded"], true);
}

#[test]
fn hot_add_use_replace_delete() {
    let s = start(|_| {});
    let probe = std::fs::read(fixture_lora("probe_diffusers")).unwrap();
    let other = std::fs::read(fixture_lora("other_diffusers")).unwrap();
    let base = s.image_b64(req(json!([]), 7));
    let with_probe = s.image_b64(req(json!([{"name": "probe_diffusers", "weight": 1.0}]), 7));
    assert_ne!(base, with_probe, "the adapter changes the image");

    // Add.
    let resp = s.put_bytes("/v1/adapters/hot-1", probe.clone());
    assert_eq!(resp.status(), StatusCode::CREATED);
    let info: Value = resp.json().unwrap();
    assert_eq!(info["name"], "hot-1");
    assert_eq!(info["loaded"], true);
    assert!(s.adapters_dir.join("hot-1.safetensors").is_file());
    // Use: same bytes as the folder's probe adapter, same image.
    assert_eq!(
        s.image_b64(req(json!([{"name": "hot-1", "weight": 1.0}]), 7)),
        with_probe
    );

    // Existing name: 409 unless overwrite=true.
    let e = assert_error(
        s.put_bytes("/v1/adapters/hot-1", other.clone()),
        StatusCode::CONFLICT,
    );
    assert_eq!(e["code"], "adapter_exists");
    let resp = s.put_bytes("/v1/adapters/hot-1?overwrite=true", other.clone());
    assert_eq!(resp.status(), StatusCode::OK);
    let replaced = s.image_b64(req(json!([{"name": "hot-1", "weight": 1.0}]), 7));
    assert_eq!(
        replaced,
        s.image_b64(req(json!([{"name": "other_diffusers", "weight": 1.0}]), 7))
    );

    // Delete, then using it is a 404 with the error body.
    let resp = s.delete("/v1/adapters/hot-1");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().unwrap()["deleted"], true);
    assert!(!s.adapters_dir.join("hot-1.safetensors").exists());
    let e = assert_error(
        s.post_json(
            "/v1/images/generations",
            &req(json!([{"name": "hot-1"}]), 7),
        ),
        StatusCode::NOT_FOUND,
    );
    assert_eq!(e["code"], "adapter_not_found");
    assert_error(s.delete("/v1/adapters/hot-1"), StatusCode::NOT_FOUND);
    assert_error(
        s.post_json("/v1/images/jobs", &req(json!([{"name": "hot-1"}]), 7)),
        StatusCode::NOT_FOUND,
    );

    // The base model is untouched by all of this.
    assert_eq!(s.image_b64(req(json!([]), 7)), base);
}

#[test]
fn upload_validation() {
    let s = start(|_| {});
    let probe = std::fs::read(fixture_lora("probe_diffusers")).unwrap();
    let before: Vec<_> = std::fs::read_dir(&s.adapters_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();

    // Bad names, path traversal included.
    for name in [
        "..%2Fx",
        "..%2F..%2Fetc%2Fpasswd",
        ".hidden",
        "-dash",
        "a%20b",
        &"n".repeat(65),
        "reload",
    ] {
        let resp = s.put_bytes(&format!("/v1/adapters/{name}"), probe.clone());
        assert!(resp.status().is_client_error(), "{name}: {}", resp.status());
        if resp.status() == StatusCode::BAD_REQUEST {
            assert_error(resp, StatusCode::BAD_REQUEST);
        }
    }
    // Not a safetensors file.
    let e = assert_error(
        s.put_bytes(
            "/v1/adapters/corrupt",
            b"definitely not safetensors".to_vec(),
        ),
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(e["code"], "invalid_adapter");
    // Truncated file.
    assert_error(
        s.put_bytes("/v1/adapters/truncated", probe[..probe.len() / 2].to_vec()),
        StatusCode::BAD_REQUEST,
    );
    // Empty body.
    assert_error(
        s.put_bytes("/v1/adapters/empty", Vec::new()),
        StatusCode::BAD_REQUEST,
    );
    // Valid safetensors whose keys are not modules of this model: the error names them.
    let bogus = {
        let t =
            candle_core::Tensor::zeros((2, 8), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        let mut m = HashMap::new();
        m.insert(
            "unet.no_such_block.to_q.lora.down.weight".to_string(),
            t.clone(),
        );
        m.insert(
            "unet.no_such_block.to_q.lora.up.weight".to_string(),
            t.t().unwrap().contiguous().unwrap(),
        );
        let path = s.root.join("bogus.safetensors");
        candle_core::safetensors::save(&m, &path).unwrap();
        std::fs::read(&path).unwrap()
    };
    let e = assert_error(
        s.put_bytes("/v1/adapters/bogus", bogus),
        StatusCode::BAD_REQUEST,
    );
    assert!(
        e["message"].as_str().unwrap().contains("no_such_block"),
        "{e}"
    );

    // Nothing was written by the failed uploads.
    let after: Vec<_> = std::fs::read_dir(&s.adapters_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before.len(), after.len(), "{after:?}");
    let list: Value = s.get("/v1/adapters").json().unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 3);

    s.assert_still_serving();
}

#[test]
fn files_dropped_into_the_folder_are_picked_up() {
    let s = start(|_| {});
    let want = s.image_b64(req(json!([{"name": "other_diffusers", "weight": 0.7}]), 3));
    // No reload call: the request finds the new file.
    copy_adapter("other_diffusers", &s.adapters_dir, "dropped");
    assert_eq!(
        s.image_b64(req(json!([{"name": "dropped", "weight": 0.7}]), 3)),
        want
    );
    // A sidecar describes where it came from.
    copy_adapter("probe_diffusers", &s.adapters_dir, "from_align");
    std::fs::write(
        s.adapters_dir.join("from_align.json"),
        r#"{"source": "align_job", "job_id": "alignjob_123", "created": 1700000000, "base_model": "tiny-sd1"}"#,
    )
    .unwrap();
    let list: Value = s.get("/v1/adapters").json().unwrap();
    let found = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "from_align")
        .cloned()
        .unwrap();
    assert_eq!(found["source"], "align_job");
    assert_eq!(found["job_id"], "alignjob_123");
    assert_eq!(found["created"], 1700000000);
    assert_eq!(found["base_model"], "tiny-sd1");

    // A corrupt file in the folder is listed with its error and gives a 400 on use.
    std::fs::write(s.adapters_dir.join("broken.safetensors"), b"garbage").unwrap();
    let reload: Value = s
        .post_json("/v1/adapters/reload", &json!({}))
        .json()
        .unwrap();
    assert_eq!(reload["added"], json!(["broken"]));
    assert_eq!(reload["count"], 6);
    assert_error(
        s.post_json(
            "/v1/images/generations",
            &req(json!([{"name": "broken"}]), 3),
        ),
        StatusCode::BAD_REQUEST,
    );
    let list: Value = s.get("/v1/adapters").json().unwrap();
    let broken = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "broken")
        .cloned()
        .unwrap();
    assert!(broken["error"].is_string(), "{broken}");

    // Removed from disk: gone.
    std::fs::remove_file(s.adapters_dir.join("dropped.safetensors")).unwrap();
    assert_error(
        s.post_json(
            "/v1/images/generations",
            &req(json!([{"name": "dropped"}]), 3),
        ),
        StatusCode::NOT_FOUND,
    );
    let reload: Value = s
        .post_json("/v1/adapters/reload", &json!({}))
        .json()
        .unwrap();
    assert_eq!(reload["count"], 5);
    s.assert_still_serving();
}

#[test]
fn concurrent_requests_with_different_adapters_match_sequential_ones() {
    let s = start(|c| {
        c.workers = 2;
        c.queue_capacity = 16;
    });
    let cases = [
        req(json!([]), 1),
        req(json!([{"name": "probe_diffusers", "weight": 0.8}]), 1),
        req(json!([{"name": "other_diffusers", "weight": -0.7}]), 1),
        req(
            json!([{"name": "probe_kohya", "weight": 0.5}, {"name": "other_diffusers", "weight": -0.7}]),
            2,
        ),
        req(json!([]), 2),
        req(json!([{"name": "probe_diffusers", "weight": 1.0}]), 2),
    ];
    let base_before = s.image_b64(cases[0].clone());
    let sequential: Vec<String> = cases.iter().map(|c| s.image_b64(c.clone())).collect();
    assert_eq!(sequential[0], base_before);
    // kohya and diffusers forms of the probe adapter give the same image.
    assert_eq!(
        s.image_b64(req(json!([{"name": "probe_kohya", "weight": 0.8}]), 1)),
        sequential[1],
        "kohya and diffusers files of the same adapter"
    );

    let concurrent: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .iter()
            .chain(cases.iter())
            .map(|c| {
                let s = &s;
                scope.spawn(move || s.image_b64(c.clone()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, img) in concurrent.iter().enumerate() {
        assert_eq!(
            img,
            &sequential[i % cases.len()],
            "request {i} differs under concurrency"
        );
    }
    // No adapter right after adapter requests: bit-identical to the base.
    assert_eq!(s.image_b64(cases[0].clone()), base_before);
}

#[test]
fn replacing_an_adapter_does_not_affect_a_job_that_holds_it() {
    let s = start(|c| {
        c.workers = 1;
        c.limits.max_steps = 500;
    });
    let want = s.image_b64(req(json!([{"name": "probe_diffusers", "weight": 1.0}]), 4));
    copy_adapter("probe_diffusers", &s.adapters_dir, "swap");
    // Hold the worker, queue a job using "swap", then replace and delete "swap".
    let blocker = s.submit(json!({"prompt": "slow", "size": "64x64", "steps": 500, "seed": 1}));
    let blocker_id = blocker["id"].as_str().unwrap().to_string();
    let job = s.submit(req(json!([{"name": "swap", "weight": 1.0}]), 4));
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["parameters"]["loras"][0]["name"], "swap");
    let other = std::fs::read(fixture_lora("other_diffusers")).unwrap();
    assert_eq!(
        s.put_bytes("/v1/adapters/swap?overwrite=true", other)
            .status(),
        StatusCode::OK
    );
    assert_eq!(s.delete("/v1/adapters/swap").status(), StatusCode::OK);
    s.post_json(&format!("/v1/images/jobs/{blocker_id}/cancel"), &json!({}));
    let done = s.wait_terminal(&id);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["result"]["data"][0]["b64_json"].as_str().unwrap(),
        want
    );
}

#[test]
fn cache_budget_evicts_but_pinned_adapters_stay() {
    // A zero budget keeps nothing but the pinned adapter, which is loaded at start-up.
    let s = start(|c| {
        c.adapter_cache_mb = 0;
        c.pinned_adapters = vec!["probe_diffusers".into()];
    });
    let loaded = |name: &str| {
        s.get(&format!("/v1/adapters/{name}"))
            .json::<Value>()
            .unwrap()["loaded"]
            .clone()
    };
    assert_eq!(loaded("probe_diffusers"), true);
    let pinned: Value = s.get("/v1/adapters/probe_diffusers").json().unwrap();
    assert_eq!(pinned["pinned"], true);
    let a = s.image_b64(req(json!([{"name": "other_diffusers", "weight": 1.0}]), 6));
    assert_eq!(loaded("other_diffusers"), false, "evicted right after use");
    // Evicted adapters are re-read on demand and give the same result.
    assert_eq!(
        s.image_b64(req(json!([{"name": "other_diffusers", "weight": 1.0}]), 6)),
        a
    );
    s.generate(req(json!([{"name": "probe_diffusers", "weight": 1.0}]), 6));
    assert_eq!(loaded("probe_diffusers"), true);
    let metrics = s.get("/metrics").text().unwrap();
    assert!(
        metrics.contains("sdserve_adapter_cache_hits_total"),
        "{metrics}"
    );
}

/// The API an /align trainer uses: `install` a staged file with its sidecar metadata.
#[test]
fn trainers_can_install_adapters_with_metadata() {
    use sdserve::server::AdapterMeta;
    let s = start(|_| {});
    let registry = s.server.state.adapters.clone();
    let want = s.image_b64(req(json!([{"name": "probe_diffusers", "weight": 1.0}]), 5));
    let bytes = std::fs::read(fixture_lora("probe_diffusers")).unwrap();
    let install = |name: &str, meta: Option<AdapterMeta>| {
        s.server.block_on(async {
            let staged = registry.blobs().stage_bytes(&bytes).await.unwrap();
            registry.install(name, staged, meta, false, None).await
        })
    };
    let (info, created) = install("aligned-2", Some(AdapterMeta::align_job(Some("alignjob_2".into()), None))).unwrap();
    assert!(created);
    assert_eq!(info.name, "aligned-2");
    assert!(info.loaded);
    assert!(install("aligned-2", None).is_err(), "no silent overwrite");
    let listed: Value = s.get("/v1/adapters/aligned-2").json().unwrap();
    assert_eq!(listed["source"], "align_job");
    assert_eq!(listed["job_id"], "alignjob_2");
    // The folder stays self-describing: the file and its sidecar.
    assert!(s.adapters_dir.join("aligned-2.safetensors").is_file());
    let sidecar: Value = serde_json::from_slice(&std::fs::read(s.adapters_dir.join("aligned-2.json")).unwrap()).unwrap();
    assert_eq!(sidecar["job_id"], "alignjob_2");
    assert_eq!(s.image_b64(req(json!([{"name": "aligned-2", "weight": 1.0}]), 5)), want);
    // A file that is not a valid adapter is refused and leaves nothing behind.
    let junk = s.server.block_on(async {
        let staged = registry.blobs().stage_bytes(b"junk").await.unwrap();
        registry.install("aligned-3", staged, None, false, None).await
    });
    assert!(junk.is_err());
    assert!(!s.adapters_dir.join("aligned-3.safetensors").exists());
}
