//! Background tasks that keep this process in step with the rest of the deployment:
//!
//! - a heartbeat in the `instances` table, and the end (`interrupted`) of the jobs of
//!   processes that stopped heartbeating for longer than the lease timeout;
//! - the adapter snapshot, re-synced on every registry notification (Postgres `LISTEN`) and
//!   at each poll interval, so that a change anywhere is served here within the interval;
//! - cancels of this process's image jobs requested on another replica.

use tokio::sync::broadcast::error::RecvError;

use super::state::AppState;
use crate::stores::Change;

/// Starts the tasks on the current runtime.
pub fn start(state: &AppState) {
    state.stores.db.start_listener();
    tokio::spawn(heartbeat(state.clone()));
    tokio::spawn(follow_changes(state.clone()));
}

/// Leaves the deployment: the trainers stop taking jobs and the others stop counting on this
/// process (its unfinished jobs end as interrupted at the next reap, by anyone).
pub async fn leave(state: &AppState) {
    state.stores.db.notify(Change::Job(String::new())).await;
    if let Err(e) = state.stores.instances.deregister(&state.instance_id).await {
        tracing::warn!("cannot deregister {}: {e:#}", state.instance_id);
    }
    if let Err(e) = state.stores.instances.reap(state.config.stores.lease_timeout()).await {
        tracing::warn!("cannot end this process's jobs: {e:#}");
    }
}

async fn heartbeat(state: AppState) {
    let every = state.config.stores.heartbeat_interval();
    let lease = state.config.stores.lease_timeout();
    let role = state.config.role.as_str();
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if state.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if let Err(e) = state.stores.instances.heartbeat(&state.instance_id, role).await {
            tracing::warn!("heartbeat failed: {e:#}");
            continue;
        }
        if let Err(e) = state.stores.instances.reap(lease).await {
            tracing::warn!("cannot check for stopped processes: {e:#}");
        }
        // Deployment-wide, for autoscaling trainers on queue depth.
        if let Ok(n) = state.stores.align.count(crate::align::jobs::AlignStatus::Queued).await {
            metrics::gauge!("sdserve_align_jobs_queued").set(n as f64);
        }
    }
}

/// Re-syncs adapters and checks remote cancels on every change notification, and at least
/// once per poll interval.
async fn follow_changes(state: AppState) {
    let poll = state.config.stores.poll_interval();
    let mut changes = state.stores.db.subscribe();
    loop {
        let (adapters, jobs) = match tokio::time::timeout(poll, changes.recv()).await {
            Ok(Ok(Change::Adapters(_))) => (true, false),
            Ok(Ok(Change::Job(_))) => (false, true),
            Ok(Err(RecvError::Lagged(_))) | Err(_) => (true, true),
            Ok(Err(RecvError::Closed)) => return,
        };
        if adapters {
            match state.adapters.sync().await {
                Ok(names) if !names.is_empty() => tracing::info!("adapters changed elsewhere: {names:?}"),
                Ok(_) => {}
                Err(e) => tracing::warn!("cannot sync the adapter registry: {e:#}"),
            }
        }
        if jobs {
            apply_remote_cancels(&state).await;
        }
        if state.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
    }
}

async fn apply_remote_cancels(state: &AppState) {
    let live = state.jobs.live_ids();
    match state.jobs.records().cancel_requests(&live).await {
        Ok(ids) => {
            for id in ids {
                tracing::info!(job = %id, "cancel requested on another replica");
                state.jobs.cancel(&id);
            }
        }
        Err(e) => tracing::warn!("cannot check for cancel requests: {e:#}"),
    }
}
