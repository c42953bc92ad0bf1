//! The stores on both engines (a SQLite file, and a real PostgreSQL started here): concurrent
//! claimers take every /align job exactly once, the registry's revisions report changes and
//! deletions, and the jobs of a process that stops heartbeating end interrupted.

mod cluster_support;

use std::collections::BTreeMap;
use std::time::Duration;

use cluster_support::{align_body, Postgres, TempDir};
use sdserve::align::jobs::AlignStatus;
use sdserve::stores::{AdapterMeta, AdapterRecord, Db, Stores};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

async fn claims_each_job_once(stores: Stores) {
    let request: sdserve::align::request::AlignRequest = serde_json::from_value(align_body("x", 1)).unwrap();
    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(stores.align.submit(&request, 1).await.unwrap().id);
    }
    let claimers: Vec<_> = (0..6)
        .map(|i| {
            let stores = stores.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while let Some(job) = stores.align.claim(&format!("claimer-{i}")).await.unwrap() {
                    mine.push(job.id);
                }
                mine
            })
        })
        .collect();
    let mut claimed: BTreeMap<String, usize> = BTreeMap::new();
    for c in claimers {
        for id in c.await.unwrap() {
            *claimed.entry(id).or_default() += 1;
        }
    }
    assert_eq!(claimed.len(), ids.len(), "every job was claimed");
    assert!(claimed.values().all(|&n| n == 1), "{claimed:?}");
    assert_eq!(stores.align.count(AlignStatus::Running).await.unwrap(), 30);
    // None of the claimers heartbeats: all their jobs end interrupted.
    let ended = stores.instances.reap(Duration::from_secs(30)).await.unwrap();
    assert_eq!(ended.len(), 30);
    let job = stores.align.get(&ids[0]).await.unwrap().unwrap();
    assert_eq!(job.status, AlignStatus::Failed);
    assert_eq!(job.error.unwrap().code, "interrupted");
    assert_eq!(job.events.last().unwrap().kind, "failed");
}

async fn live_instances_keep_their_jobs(stores: Stores) {
    let request: sdserve::align::request::AlignRequest = serde_json::from_value(align_body("y", 1)).unwrap();
    let id = stores.align.submit(&request, 1).await.unwrap().id;
    stores.instances.heartbeat("trainer-live", "trainer").await.unwrap();
    assert_eq!(stores.align.claim("trainer-live").await.unwrap().unwrap().id, id);
    assert!(stores.instances.reap(Duration::from_secs(30)).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Past a 0.1 s lease without a heartbeat, it is dead.
    assert_eq!(stores.instances.reap(Duration::from_millis(100)).await.unwrap(), vec![id.clone()]);
    // Its late writes change nothing.
    let finished = stores.align.finish(&id, "trainer-live", AlignStatus::Succeeded, None, Some("completed")).await.unwrap();
    assert!(!finished);
    assert_eq!(stores.align.get(&id).await.unwrap().unwrap().status, AlignStatus::Failed);
}

async fn registry_revisions(stores: Stores) {
    let reg = &stores.registry;
    let start = reg.revision().await.unwrap();
    let rec = |name: &str, sha: &str| AdapterRecord {
        name: name.into(),
        sha256: sha.into(),
        blob_key: format!("blobs/{sha}.safetensors"),
        size_bytes: 3,
        meta: AdapterMeta::default(),
        created_at: 0,
        updated_at: 0,
        revision: 0,
    };
    reg.publish(&rec("a", "1"), false, None).await.unwrap();
    reg.publish(&rec("b", "2"), false, None).await.unwrap();
    assert!(matches!(reg.publish(&rec("a", "3"), false, None).await.unwrap(), sdserve::stores::registry::Publish::Exists));
    let after_two = reg.changes_since(start).await.unwrap();
    assert_eq!(after_two.changed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    reg.publish(&rec("a", "3"), true, None).await.unwrap();
    reg.remove("b").await.unwrap();
    let later = reg.changes_since(after_two.revision).await.unwrap();
    let changed: BTreeMap<_, _> = later.changed.into_iter().collect();
    assert_eq!(changed["a"].as_ref().unwrap().sha256, "3");
    assert!(changed["b"].is_none(), "a deletion is reported");
    assert!(reg.changes_since(later.revision).await.unwrap().changed.is_empty());
    assert!(!reg.blob_in_use("blobs/1.safetensors").await.unwrap());
    assert!(reg.blob_in_use("blobs/3.safetensors").await.unwrap());
}

fn on_both(test: fn(Stores) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>) {
    let rt = runtime();
    let dir = TempDir::new("stores");
    let sqlite = rt.block_on(Db::connect(&sdserve::stores::db::sqlite_url(&dir.0))).unwrap();
    rt.block_on(test(Stores::with_db(sqlite)));
    let pg = Postgres::start();
    let postgres = rt.block_on(Db::connect(&pg.url)).unwrap();
    rt.block_on(test(Stores::with_db(postgres)));
}

#[test]
fn concurrent_claimers_take_each_job_once() {
    on_both(|s| Box::pin(claims_each_job_once(s)));
}

#[test]
fn a_process_that_stops_heartbeating_loses_its_jobs() {
    on_both(|s| Box::pin(live_instances_keep_their_jobs(s)));
}

#[test]
fn registry_revisions_report_changes_and_deletions() {
    on_both(|s| Box::pin(registry_revisions(s)));
}
