//! The router: routes, fallbacks and middleware (auth, metrics, tracing, CORS).

pub mod adapters;
pub mod align;
pub mod docs;
pub mod edits;
pub mod events;
pub mod images;
pub mod jobs;
pub mod system;

use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, Method};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{get, post};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;
use super::state::AppState;

/// The API routes, still needing their state: all of them, or for a `trainer` process only
/// the probes and metrics.
fn routes(state: &AppState) -> Router<AppState> {
    let probes = Router::new()
        .route("/health", get(system::health))
        .route("/ready", get(system::ready))
        .route("/metrics", get(system::metrics));
    if !state.config.role.serves() {
        return probes;
    }
    let image_mb = state.config.limits.max_image_upload_mb.saturating_mul(1024 * 1024);
    let image_limit = DefaultBodyLimit::max(usize::try_from(image_mb).unwrap_or(usize::MAX));
    Router::new()
        .route("/v1/images/generations", post(images::create_image))
        .route("/v1/images/edits", post(edits::create_image_edit).layer(image_limit))
        .route("/v1/images/jobs", post(jobs::create_job).layer(image_limit))
        .route("/v1/images/jobs/{id}", get(jobs::get_job))
        .route("/v1/images/jobs/{id}/cancel", post(jobs::cancel_job))
        .route("/v1/images/jobs/{id}/events", get(jobs::job_events))
        .route("/v1/adapters", get(adapters::list_adapters))
        .route("/v1/adapters/reload", post(adapters::reload_adapters))
        .route(
            "/v1/adapters/{name}",
            get(adapters::get_adapter)
                .put(adapters::put_adapter)
                .delete(adapters::delete_adapter),
        )
        .route("/align", post(align::create_align_job))
        .route("/v1/align/jobs", post(align::create_align_job).get(align::list_align_jobs))
        .route("/v1/align/jobs/{id}", get(align::get_align_job))
        .route("/v1/align/jobs/{id}/cancel", post(align::cancel_align_job))
        .route("/v1/align/jobs/{id}/events", get(align::align_job_events))
        .route("/v1/align/rewards", get(align::list_rewards))
        .route("/v1/models", get(system::list_models))
        .route("/v1/models/{id}", get(system::get_model))
        .merge(probes)
        .route("/openapi.json", get(system::openapi_json))
        .route("/docs", get(docs::page))
        .route("/docs/redoc.standalone.js", get(docs::redoc))
}

fn cors(origins: &[String]) -> anyhow::Result<Option<CorsLayer>> {
    let origins: Vec<&str> = origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .collect();
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.contains(&"*") {
        AllowOrigin::any()
    } else {
        let values = origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o).map_err(|_| anyhow::anyhow!("invalid CORS origin {o:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        AllowOrigin::list(values)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([header::RETRY_AFTER, header::LOCATION])
            .max_age(Duration::from_secs(3600)),
    ))
}

/// The complete application: [`routes`], error fallbacks and middleware.
pub fn app(state: AppState) -> anyhow::Result<Router> {
    let cors = cors(&state.config.cors_origins)?;
    let router = routes(&state)
        .fallback(system::not_found)
        .method_not_allowed_fallback(system::method_not_allowed)
        .layer(from_fn_with_state(state.clone(), super::auth::require_key))
        .layer(from_fn(super::metrics::track))
        .layer(TraceLayer::new_for_http());
    let router = match cors {
        Some(c) => router.layer(c),
        None => router,
    };
    Ok(router.with_state(state))
}
