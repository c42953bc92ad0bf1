//! Several `sdserve` processes on one PostgreSQL database and one S3-compatible bucket (real
//! servers, started here): two api replicas and trainers. Jobs and adapters are seen from every
//! replica, a killed trainer's job ends interrupted with no adapter, everything survives a
//! restart, and two trainers never run the same job.

mod cluster_support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};

use cluster_support::{align_body, eventually, terminal, ClusterConfig, Postgres, Sdserve, S3};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn submit_align(node: &Sdserve, body: &Value) -> String {
    let resp = node.post("/align", body);
    let status = resp.status();
    let text = resp.text().unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    serde_json::from_str::<Value>(&text).unwrap()["id"].as_str().unwrap().to_string()
}

fn align_job(node: &Sdserve, id: &str) -> Value {
    node.get_json(&format!("/v1/align/jobs/{id}"))
}

fn image(node: &Sdserve, loras: Value) -> reqwest::blocking::Response {
    node.post("/v1/images/generations", &json!({"prompt": "two red circles", "size": "32x32", "steps": 2, "seed": 5, "loras": loras}))
}

/// Server-sent events of an align job: `(type, id)` pairs until the stream ends.
fn sse(node: &Sdserve, path: &str, last_event_id: Option<u64>) -> Vec<(String, u64)> {
    let mut req = node.client.get(format!("{}{path}", node.url)).header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id.to_string());
    }
    let mut events = Vec::new();
    let (mut kind, mut id) = (String::new(), 0);
    for line in BufReader::new(req.send().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(v) = line.strip_prefix("event:") {
            kind = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("id:") {
            id = v.trim().parse().unwrap();
        } else if line.is_empty() && !kind.is_empty() {
            events.push((std::mem::take(&mut kind), id));
        }
    }
    events
}

#[test]
fn two_api_replicas_and_a_trainer_share_jobs_and_adapters() {
    let pg = Postgres::start();
    let s3 = S3::start();
    let cfg = ClusterConfig::new(&pg, &s3);
    let a = Sdserve::start("api-a", "api", &cfg);
    let b = Sdserve::start("api-b", "api", &cfg);
    let mut trainer = Sdserve::start("trainer", "trainer", &cfg);
    // A trainer serves only the probes.
    assert_eq!(trainer.get("/v1/adapters").status(), StatusCode::NOT_FOUND);
    assert_eq!(trainer.get_json("/ready")["role"], "trainer");

    // An /align job submitted to A runs on the trainer; B reports it and serves its adapter.
    let id = submit_align(&a, &align_body("shared", 3));
    let done = eventually(300.0, "the job ends", || Some(align_job(&b, &id)).filter(terminal));
    assert_eq!(done["status"], "succeeded", "{done}\n{}", trainer.log());
    assert!(trainer.log().contains(&format!("align job {id} claimed")), "the trainer ran it");
    assert!(!a.log().contains("claimed") && !b.log().contains("claimed"), "api replicas train nothing");
    let usable = std::time::Instant::now();
    eventually(2.0, "the adapter is usable on B within 2 s", || image(&b, json!([{"name": "shared"}])).status().is_success().then_some(()));
    println!("adapter usable on replica B {:.0} ms after its job was seen succeeded", usable.elapsed().as_secs_f64() * 1e3);
    let on_a = image(&a, json!([{"name": "shared"}])).json::<Value>().unwrap();
    let on_b = image(&b, json!([{"name": "shared"}])).json::<Value>().unwrap();
    assert_eq!(on_a["data"][0]["b64_json"], on_b["data"][0]["b64_json"], "the same version everywhere");
    assert_eq!(on_a["parameters"]["loras"][0]["sha256"], b.get_json("/v1/adapters/shared")["sha256"]);
    let blobs: Vec<String> = s3.keys();
    assert!(blobs.iter().any(|k| k.starts_with("sdserve/blobs/")), "{blobs:?}");

    // Events from B: the JSON log and the stream end with the final status; a resume from the
    // last id sends nothing more.
    let events = b.get_json(&format!("/v1/align/jobs/{id}/events"))["data"].as_array().unwrap().clone();
    assert_eq!(events.iter().filter(|e| e["type"] == "metrics").count(), 3);
    assert_eq!(events.last().unwrap()["type"], "succeeded");
    let stream = sse(&b, &format!("/v1/align/jobs/{id}/events"), None);
    assert_eq!(stream.last().unwrap().0, "succeeded", "{stream:?}");
    let last_id = stream.last().unwrap().1;
    assert!(sse(&b, &format!("/v1/align/jobs/{id}/events"), Some(last_id)).is_empty());
    let resumed = sse(&b, &format!("/v1/align/jobs/{id}/events"), Some(2));
    assert_eq!(resumed.first().unwrap().1, 3, "resumes right after the given id");

    // An upload on B replaces the adapter on A too; a delete on A removes it from B.
    let fixture = std::fs::read(cluster_support::fixture_dir().join("loras/probe_diffusers.safetensors")).unwrap();
    assert_eq!(b.put("/v1/adapters/uploaded", fixture).status(), StatusCode::CREATED);
    eventually(2.0, "the upload is usable on A", || image(&a, json!([{"name": "uploaded"}])).status().is_success().then_some(()));
    assert_eq!(a.client.delete(format!("{}/v1/adapters/uploaded", a.url)).send().unwrap().status(), StatusCode::OK);
    eventually(2.0, "the delete reaches B", || (image(&b, json!([{"name": "uploaded"}])).status() == StatusCode::NOT_FOUND).then_some(()));

    // Cancel from B stops a job running on the trainer; no adapter appears.
    let long = submit_align(&a, &align_body("long", 500));
    eventually(120.0, "the long job runs", || Some(align_job(&b, &long)).filter(|j| j["step"].as_u64().unwrap_or(0) >= 1));
    assert_eq!(b.post(&format!("/v1/align/jobs/{long}/cancel"), &json!({})).status(), StatusCode::OK);
    let cancelled = eventually(60.0, "the cancel takes effect", || Some(align_job(&a, &long)).filter(terminal));
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert!(cancelled["step"].as_u64().unwrap() < 500);
    assert_eq!(a.get("/v1/adapters/long").status(), StatusCode::NOT_FOUND);

    // kill -9 the trainer mid-job: the job ends interrupted after the lease, and no adapter
    // (nor blob) of it ever shows up.
    let blobs_before = s3.keys();
    let doomed = submit_align(&b, &align_body("doomed", 500));
    eventually(120.0, "the doomed job runs", || Some(align_job(&a, &doomed)).filter(|j| j["step"].as_u64().unwrap_or(0) >= 1));
    trainer.kill();
    let ended = eventually(30.0, "the job of the killed trainer ends", || Some(align_job(&b, &doomed)).filter(terminal));
    assert_eq!(ended["status"], "failed", "{ended}");
    assert_eq!(ended["error"]["code"], "interrupted", "{ended}");
    assert_eq!(b.get("/v1/adapters/doomed").status(), StatusCode::NOT_FOUND);
    assert_eq!(s3.keys(), blobs_before, "no blob from the killed run");

    // Image jobs: submitted to A, read from B.
    let img = a.post("/v1/images/jobs", &json!({"prompt": "kept", "size": "32x32", "steps": 2, "seed": 8})).json::<Value>().unwrap();
    let img_id = img["id"].as_str().unwrap().to_string();
    let img_done = eventually(60.0, "the image job ends", || Some(b.get_json(&format!("/v1/images/jobs/{img_id}"))).filter(terminal));
    assert_eq!(img_done["status"], "succeeded", "{img_done}");

    // Restart every process: jobs and adapters are all still there.
    let jobs_before = a.get_json("/v1/align/jobs")["data"].as_array().unwrap().len();
    drop((a, b, trainer));
    let a = Sdserve::start("api-a2", "api", &cfg);
    let b = Sdserve::start("api-b2", "api", &cfg);
    let _trainer = Sdserve::start("trainer2", "trainer", &cfg);
    let jobs_after: Vec<Value> = b.get_json("/v1/align/jobs")["data"].as_array().unwrap().clone();
    assert_eq!(jobs_after.len(), jobs_before);
    let status: BTreeMap<String, String> = jobs_after.iter().map(|j| (j["adapter_name"].as_str().unwrap().into(), j["status"].as_str().unwrap().into())).collect();
    assert_eq!(status["shared"], "succeeded");
    assert_eq!(status["long"], "cancelled");
    assert_eq!(status["doomed"], "failed");
    let after = a.get_json(&format!("/v1/images/jobs/{img_id}"));
    assert_eq!(after["result"], img_done["result"]);
    let again = image(&b, json!([{"name": "shared"}])).json::<Value>().unwrap();
    assert_eq!(again["data"][0]["b64_json"], on_b["data"][0]["b64_json"]);
}

#[test]
fn two_trainers_never_run_the_same_job() {
    let pg = Postgres::start();
    let s3 = S3::start();
    let cfg = ClusterConfig::new(&pg, &s3);
    let api = Sdserve::start("api", "api", &cfg);
    let t1 = Sdserve::start("trainer-1", "trainer", &cfg);
    let t2 = Sdserve::start("trainer-2", "trainer", &cfg);
    let ids: Vec<String> = (0..8).map(|i| submit_align(&api, &align_body(&format!("job{i}"), 1))).collect();
    for id in &ids {
        let job = eventually(300.0, "every job ends", || Some(align_job(&api, id)).filter(terminal));
        assert_eq!(job["status"], "succeeded", "{job}");
        let started = job["events"].as_array().unwrap().iter().filter(|e| e["message"] == "job started").count();
        assert_eq!(started, 1, "{job}");
    }
    let (l1, l2) = (t1.log(), t2.log());
    let runs = |log: &str, id: &str| log.matches(&format!("align job {id} claimed")).count();
    for id in &ids {
        assert_eq!(runs(&l1, id) + runs(&l2, id), 1, "job {id} claimed once in all");
    }
    let shares = (ids.iter().filter(|id| runs(&l1, id) == 1).count(), ids.iter().filter(|id| runs(&l2, id) == 1).count());
    println!("jobs run by trainer 1 / trainer 2: {shares:?}");
}
