//! Server benchmarks (`cargo bench --bench server`): adapter switch cost (building a request's
//! adapter set from a cached vs an uncached adapter) and requests/second for 64×64, 10-step
//! images with 1 and 2 workers, on the fixture model.

#[path = "../tests/server_support/mod.rs"]
mod server_support;

use std::time::Instant;

use serde_json::json;
use server_support::{copy_adapter, fixture_lora, start};

fn main() {
    use sdserve::lora::PipelineLora;
    let s = start(|c| c.adapter_cache_mb = 64);
    let registry = s.server.state.adapters.clone();
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let mut uncached = Vec::new();
    let mut cached = Vec::new();
    for i in 0..20 {
        let name = format!("m{i}");
        copy_adapter("probe_diffusers", &s.adapters_dir, &name);
        let t = Instant::now();
        let a = s.server.block_on(registry.resolve(&name)).unwrap();
        let mut lora = PipelineLora::default();
        a.adapter.add_to(0.8, &mut lora);
        uncached.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let a = s.server.block_on(registry.resolve(&name)).unwrap();
        let mut lora = PipelineLora::default();
        a.adapter.add_to(0.8, &mut lora);
        cached.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "adapter switch (probe_diffusers, rank 4, {} KiB): uncached {:.3} ms, cached {:.3} ms (medians of 20)",
        std::fs::metadata(fixture_lora("probe_diffusers")).unwrap().len() / 1024,
        median(uncached),
        median(cached)
    );
    drop(s);

    for workers in [1usize, 2] {
        let s = start(|c| {
            c.workers = workers;
            c.queue_capacity = 64;
        });
        let body = json!({"prompt": "two red circles and a blue square", "size": "64x64", "steps": 10, "seed": 1});
        s.image_b64(body.clone()); // warm-up
        let n = 12;
        let t = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let s = &s;
                let body = body.clone();
                scope.spawn(move || {
                    for _ in 0..n / 4 {
                        s.image_b64(body.clone());
                    }
                });
            }
        });
        let secs = t.elapsed().as_secs_f64();
        println!("64x64, 10 steps, cfg 7.5, {workers} worker(s): {n} requests in {secs:.2} s = {:.2} req/s", n as f64 / secs);
        let with_lora = json!({"prompt": "two red circles and a blue square", "size": "64x64", "steps": 10, "seed": 1,
            "loras": [{"name": "probe_diffusers", "weight": 0.8}]});
        s.image_b64(with_lora.clone());
        let t = Instant::now();
        for _ in 0..4 {
            s.image_b64(with_lora.clone());
        }
        println!(
            "  with one rank-4 adapter, sequential: {:.2} req/s",
            4.0 / t.elapsed().as_secs_f64()
        );
    }
}
