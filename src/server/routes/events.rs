//! What the server-sent event streams share: resuming after `Last-Event-ID`, and waiting for
//! the next change of a job (a notification from this or another process, or a poll).

use std::time::Duration;

use axum::http::HeaderMap;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;

use crate::stores::Change;

/// The id a reconnecting EventSource sends.
pub fn last_event_id(headers: &HeaderMap) -> Option<u64> {
    headers.get("last-event-id")?.to_str().ok()?.trim().parse().ok()
}

/// Returns when job `id` may have changed: a notification about it, or `poll` passed.
pub async fn next_change(changes: &mut Receiver<Change>, id: &str, poll: Duration) {
    let _ = tokio::time::timeout(poll, async {
        loop {
            match changes.recv().await {
                Ok(Change::Job(j)) if j == id => return,
                Ok(_) => {}
                Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => return,
            }
        }
    })
    .await;
}
