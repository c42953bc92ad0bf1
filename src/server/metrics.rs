//! Prometheus metrics: the process-wide recorder (installed once, however many servers a
//! process starts) and the per-request middleware.
//!
//! Metrics: `sdserve_http_requests_total{method,route,status}`,
//! `sdserve_http_request_duration_seconds{method,route}`, `sdserve_generation_seconds`,
//! `sdserve_queue_wait_seconds`, `sdserve_queue_depth`, `sdserve_jobs_running`,
//! `sdserve_image_jobs_total{status}`, `sdserve_images_generated_total`,
//! `sdserve_queue_rejections_total`, `sdserve_adapter_cache_hits_total`,
//! `sdserve_adapter_cache_misses_total`, `sdserve_adapter_load_seconds`,
//! `sdserve_adapter_apply_seconds`, `sdserve_adapter_cache_bytes`,
//! `sdserve_align_jobs_submitted_total`, `sdserve_align_jobs_total{status}`,
//! `sdserve_align_jobs_running`, `sdserve_align_step_seconds`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];
const ADAPTER_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0,
];

/// The process's Prometheus handle, installing the global recorder on first use. `None` if
/// another recorder was installed first (metrics then go there).
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                // Matchers are tried Full, then Prefix, then Suffix.
                .set_buckets_for_metric(Matcher::Prefix("sdserve_adapter_".into()), ADAPTER_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                });
            let handle = match builder.map(|b| b.install_recorder()) {
                Ok(Ok(h)) => h,
                Ok(Err(e)) | Err(e) => {
                    tracing::warn!(
                        "Prometheus recorder not installed ({e}); /metrics will be empty"
                    );
                    return None;
                }
            };
            describe();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("sdserve-metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .ok();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "sdserve_http_requests_total",
        "HTTP requests by method, route and status"
    );
    describe_histogram!(
        "sdserve_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency"
    );
    describe_histogram!(
        "sdserve_generation_seconds",
        Unit::Seconds,
        "Time to run one image job (all its images)"
    );
    describe_histogram!(
        "sdserve_queue_wait_seconds",
        Unit::Seconds,
        "Time jobs waited in the queue"
    );
    describe_gauge!("sdserve_queue_depth", "Jobs waiting in the queue");
    describe_gauge!("sdserve_jobs_running", "Jobs running on the workers");
    describe_counter!(
        "sdserve_image_jobs_total",
        "Finished image jobs by final status"
    );
    describe_counter!("sdserve_images_generated_total", "Images generated");
    describe_counter!(
        "sdserve_queue_rejections_total",
        "Submissions refused with 429 because the queue was full"
    );
    describe_counter!(
        "sdserve_adapter_cache_hits_total",
        "Adapter lookups served from the cache"
    );
    describe_counter!(
        "sdserve_adapter_cache_misses_total",
        "Adapter lookups that read and parsed the file"
    );
    describe_histogram!(
        "sdserve_adapter_load_seconds",
        Unit::Seconds,
        "Time to read and parse an adapter file"
    );
    describe_histogram!(
        "sdserve_adapter_apply_seconds",
        Unit::Seconds,
        "Time to build a request's adapter set from parsed adapters"
    );
    describe_gauge!(
        "sdserve_adapter_cache_bytes",
        Unit::Bytes,
        "Memory held by parsed adapters in the cache"
    );
    describe_counter!("sdserve_align_jobs_submitted_total", "Align jobs accepted");
    describe_counter!("sdserve_align_jobs_total", "Align jobs finished, by status");
    describe_gauge!("sdserve_align_jobs_running", "Align jobs running now");
    describe_histogram!(
        "sdserve_align_step_seconds",
        Unit::Seconds,
        "Time of one AlignProp optimisation step"
    );
}

/// Counts requests and records their latency, labelled by route template (not raw path).
pub async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_owned();
    let start = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("sdserve_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("sdserve_http_request_duration_seconds", "method" => method, "route" => route)
        .record(start.elapsed().as_secs_f64());
    response
}

/// The Prometheus text exposition.
pub fn render() -> String {
    handle().map(|h| h.render()).unwrap_or_default()
}
