//! `sdserve serve` and `sdserve openapi`.

use anyhow::{Context, Result};

use crate::server::ServerConfig;

/// Runs the HTTP server until Ctrl-C / SIGTERM.
pub fn run(config: ServerConfig) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(crate::server::serve(config))
}

/// Prints the OpenAPI document (what `openapi/openapi.json` must contain).
pub fn print_openapi() -> Result<()> {
    use std::io::Write;
    std::io::stdout().write_all(crate::server::openapi::spec_json().as_bytes())?;
    Ok(())
}
