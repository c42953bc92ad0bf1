//! The HTTP server (`sdserve serve`): OpenAI-compatible image generation with per-request
//! LoRA adapters, an async job API with progress and cancellation, adapter management,
//! Prometheus metrics and an OpenAPI document.
//!
//! Layout, one job per module:
//! - [`config`]: flags and `SDSERVE_*` environment variables.
//! - [`api`]: request/response types (also the OpenAPI schemas); [`error`]: the OpenAI-style
//!   error envelope; [`extract`]: extractors whose rejections use it.
//! - [`params`]: request validation into a [`jobs::JobSpec`]; [`edit_form`] and
//!   [`edit_params`]: the multipart form of image edits and its validation.
//! - [`jobs`]: jobs and the bounded queue; [`worker`]: the generation threads.
//! - [`adapters`]: the adapters this replica serves (a snapshot of the shared registry) and
//!   their LRU cache; [`sync`]: the background tasks that keep this process in step with the
//!   others (heartbeat, registry changes, remote cancels, ending dead processes' jobs).
//! - [`model`]: the model, loaded in the background; [`state`]: what handlers share.
//! - [`routes`]: handlers and the router; [`auth`], [`metrics`]: middleware; [`openapi`]: the
//!   document; [`http`]: the connections (timeouts, protocol errors, graceful shutdown).
//! - [`align`]: the /align trainers (roles `all` and `trainer`).
//!
//! Shared state (jobs, the adapter registry, blobs) lives in `crate::stores`.
//!
//! Start it with [`serve`], or [`Server::bind`] + [`Server::run_until`] to learn the bound
//! address first, or [`spawn`] for a server on its own runtime thread (tests, benches).

pub mod adapters;
pub mod align;
pub mod api;
pub mod auth;
pub mod config;
pub mod edit_form;
pub mod edit_params;
pub mod error;
pub mod extract;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod model;
pub mod openapi;
pub mod params;
pub mod routes;
pub mod state;
pub mod sync;
pub mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::Router;

pub use adapters::AdapterRegistry;
pub use config::{Role, ServerConfig};
pub use crate::stores::AdapterMeta;
pub use error::ApiError;
pub use model::{ModelSlot, ModelStatus};
pub use state::AppState;


/// A bound, not yet running server.
pub struct Server {
    addr: SocketAddr,
    state: AppState,
    listener: tokio::net::TcpListener,
    router: Router,
}

impl Server {
    /// Binds the listener and starts loading the model on a background thread (`/ready` turns
    /// 200 once it is loaded; the workers start then).
    pub async fn bind(config: ServerConfig) -> Result<Self> {
        config.validate()?;
        metrics::handle();
        if let Err(e) = std::fs::create_dir_all(&config.data_dir) {
            tracing::warn!(
                "cannot create data folder {}: {e}",
                config.data_dir.display()
            );
        }
        let host = config.host.clone();
        let port = config.port;
        let state = AppState::new(config).await?;
        sync::start(&state);
        let router = routes::app(state.clone())?;
        let listener = tokio::net::TcpListener::bind((host.as_str(), port))
            .await
            .with_context(|| format!("cannot listen on {host}:{port}"))?;
        let addr = listener.local_addr()?;
        start_loading(&state);
        Ok(Self {
            addr,
            state,
            listener,
            router,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until Ctrl-C / SIGTERM; fails if the model cannot be loaded.
    pub async fn run(self) -> Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `shutdown` completes; fails if the model cannot be loaded. Queued jobs are
    /// cancelled on the way out and workers stop after their current job.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let state = self.state.clone();
        let model_failed = async {
            match state.model.wait().await {
                Err(e) => e,
                Ok(_) => std::future::pending().await,
            }
        };
        let timeouts = http::Timeouts {
            header: Duration::from_secs(state.config.header_timeout_s),
            body_idle: Duration::from_secs(state.config.body_timeout_s),
        };
        let result = tokio::select! {
            () = http::serve(self.listener, self.router, timeouts, shutdown) => Ok(()),
            e = model_failed => Err(anyhow::anyhow!("cannot load the model: {e}")),
        };
        state.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        state.jobs.close();
        sync::leave(&state).await;
        result
    }
}

fn start_loading(state: &AppState) {
    let state = state.clone();
    let rt = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("sdserve-load".into())
        .spawn(move || {
            let cfg = state.config.clone();
            let start = Instant::now();
            tracing::info!("loading model from {}", cfg.model.display());
            let loaded = cfg.device.load(&cfg.model);
            match loaded {
                Ok(sd) => {
                    let sd = Arc::new(sd);
                    tracing::info!(
                        "model {} loaded in {:.1} s",
                        state.model_id,
                        start.elapsed().as_secs_f64()
                    );
                    if cfg.role.serves() {
                        rt.block_on(state.adapters.preload_pinned(&sd));
                        worker::spawn_workers(cfg.workers, state.jobs.clone(), sd.clone());
                    }
                    state.model.set(ModelStatus::Ready(sd));
                    if cfg.role.trains() {
                        align::start(&state, &rt);
                    }
                }
                Err(e) => {
                    tracing::error!("cannot load the model from {}: {e:#}", cfg.model.display());
                    state.model.set(ModelStatus::Failed(format!("{e:#}")));
                }
            }
        })
        .expect("cannot spawn the model-loading thread");
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}

/// Binds and serves until Ctrl-C / SIGTERM.
pub async fn serve(config: ServerConfig) -> Result<()> {
    let server = Server::bind(config).await?;
    tracing::info!("{} listening on http://{} (docs at /docs)", server.state.instance_id, server.addr());
    server.run().await
}

/// A server running on its own thread and runtime; stops when dropped.
pub struct BackgroundServer {
    pub addr: SocketAddr,
    pub state: AppState,
    rt: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl BackgroundServer {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Runs a future on the server's runtime (the state's database pool lives there); call it
    /// from outside any runtime.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Blocks until the model is loaded (or `timeout` passes).
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            match self.state.model.status() {
                ModelStatus::Ready(_) => return Ok(()),
                ModelStatus::Failed(e) => anyhow::bail!("model failed to load: {e}"),
                ModelStatus::Loading if start.elapsed() > timeout => {
                    anyhow::bail!("model not loaded after {timeout:?}")
                }
                ModelStatus::Loading => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a server on a background thread with its own tokio runtime and returns once it
/// listens (the model may still be loading: see [`BackgroundServer::wait_ready`]).
pub fn spawn(config: ServerConfig) -> Result<BackgroundServer> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("sdserve-http".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            runtime.block_on(async move {
                let server = match Server::bind(config).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
                let rt = tokio::runtime::Handle::current();
                let _ = tx.send(Ok((server.addr(), server.state().clone(), rt, stop_tx)));
                if let Err(e) = server
                    .run_until(async move {
                        let _ = stop_rx.await;
                    })
                    .await
                {
                    tracing::error!("background server stopped: {e:#}");
                }
            });
        })?;
    let (addr, state, rt, stop) = rx.recv().context("the server thread died")??;
    Ok(BackgroundServer {
        addr,
        state,
        rt,
        stop: Some(stop),
    })
}
