//! Cluster benchmarks (`cargo bench --bench cluster`), on real PostgreSQL and s3s-fs servers
//! started here (see `scripts/install-test-deps.sh`) and the fixture model:
//!
//! 1. adapter propagation: an upload on replica A until replica B serves the new version
//!    (Postgres `LISTEN/NOTIFY`; and two processes on one SQLite file, which only poll);
//! 2. /align queue throughput with one and with two trainers;
//! 3. memory of three concurrent 100 MB adapter uploads (streamed to disk).

#[path = "../tests/cluster_support/mod.rs"]
mod cluster_support;

use std::time::{Duration, Instant};

use cluster_support::{align_body, eventually, terminal, ClusterConfig, Postgres, Sdserve, TempDir, S3};
use serde_json::Value;

fn percentiles(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!("median {:.0} ms, p95 {:.0} ms, max {:.0} ms (n = {})", at(0.5), at(0.95), at(1.0), v.len())
}

/// Uploads alternate between two adapter files on A; B is asked for images with the adapter
/// (1 step, 32×32) until a response names the new sha256. (`GET /v1/adapters/{name}` would
/// read the registry on demand; generation requests use the replica's snapshot, which the
/// notifications and polls keep current.)
fn propagation(a: &Sdserve, b: &Sdserve, n: usize) -> Vec<f64> {
    let files = ["probe_diffusers", "other_diffusers"].map(|f| std::fs::read(cluster_support::fixture_dir().join(format!("loras/{f}.safetensors"))).unwrap());
    (0..n)
        .map(|i| {
            let resp = a.put("/v1/adapters/moving?overwrite=true", files[i % 2].clone());
            let uploaded = Instant::now();
            let sha = resp.json::<Value>().unwrap()["sha256"].as_str().unwrap().to_string();
            let body = serde_json::json!({"prompt": "x", "size": "32x32", "steps": 1, "seed": 1, "loras": [{"name": "moving"}]});
            eventually(10.0, "B serves the new version", || {
                let r: Value = b.post("/v1/images/generations", &body).json().ok()?;
                (r["parameters"]["loras"][0]["sha256"].as_str() == Some(&sha)).then_some(())
            });
            uploaded.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

fn queue_throughput(cfg: &ClusterConfig, trainers: usize, jobs: usize) -> f64 {
    let api = Sdserve::start("api", "api", cfg);
    let _t: Vec<Sdserve> = (0..trainers).map(|i| Sdserve::start(&format!("trainer-{i}"), "trainer", cfg)).collect();
    let start = Instant::now();
    let ids: Vec<String> = (0..jobs)
        .map(|i| {
            let body = align_body(&format!("q{trainers}-{i}"), 2);
            api.post("/align", &body).json::<Value>().unwrap()["id"].as_str().unwrap().to_string()
        })
        .collect();
    for id in &ids {
        let job = eventually(600.0, "jobs end", || Some(api.get_json(&format!("/v1/align/jobs/{id}"))).filter(terminal));
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    jobs as f64 / start.elapsed().as_secs_f64() * 60.0
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

/// A valid safetensors file of `mb` MiB whose one tensor is not a LoRA key (refused after
/// the whole body was received and checked).
fn big_upload(mb: usize) -> Vec<u8> {
    let len = mb * 1024 * 1024;
    let header = format!(r#"{{"not_a_lora.weight":{{"dtype":"U8","shape":[{len}],"data_offsets":[0,{len}]}}}}"#);
    let mut header = header.into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    bytes.resize(bytes.len() + len, 7);
    bytes
}

fn upload_memory(cfg: &ClusterConfig) {
    let node = Sdserve::start("uploads", "all", cfg);
    let body = big_upload(100);
    let before = rss_kib(node.pid());
    let done = std::sync::atomic::AtomicBool::new(false);
    let peak = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                peak = peak.max(rss_kib(node.pid()));
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        });
        let uploads: Vec<_> = (0..3)
            .map(|i| {
                let (node, body) = (&node, body.clone());
                scope.spawn(move || node.put(&format!("/v1/adapters/big{i}"), body).status())
            })
            .collect();
        for u in uploads {
            assert_eq!(u.join().unwrap(), reqwest::StatusCode::BAD_REQUEST, "refused after the check");
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        sampler.join().unwrap()
    });
    println!(
        "3 concurrent 100 MiB uploads: server RSS {:.0} MiB before, peak {:.0} MiB (+{:.0} MiB)",
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        (peak.saturating_sub(before)) as f64 / 1024.0
    );
}

fn main() {
    let pg = Postgres::start();
    let s3 = S3::start();
    let cfg = ClusterConfig::new(&pg, &s3);
    {
        let a = Sdserve::start("a", "api", &cfg);
        let b = Sdserve::start("b", "api", &cfg);
        println!("adapter propagation A -> B, Postgres LISTEN/NOTIFY + S3 (poll 1 s): {}", percentiles(propagation(&a, &b, 20)));
    }
    {
        let shared = TempDir::new("shared");
        // No notifications between SQLite processes: B learns of a change by polling.
        let polling = ClusterConfig { database_url: None, shared_dir: Some(shared.0.clone()), ..cfg.clone() };
        let a = Sdserve::start("a", "api", &polling);
        let b = Sdserve::start("b", "api", &polling);
        println!("adapter propagation A -> B, one SQLite file (no notifications) + S3, polling every 1 s: {}", percentiles(propagation(&a, &b, 20)));
    }
    for trainers in [1, 2] {
        println!("/align queue, 8 jobs of 2 steps, {trainers} trainer(s): {:.1} jobs/min", queue_throughput(&cfg, trainers, 8));
    }
    let local = ClusterConfig { database_url: None, adapter_store: None, shared_dir: None, ..cfg.clone() };
    upload_memory(&local);
}
