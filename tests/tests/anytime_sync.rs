//! The anytime-sync protocol under rollouts, rollbacks, races, evictions and crashes, over real
//! sockets. Every scenario asserts zero mismatched answers (embedding and index from different
//! versions) in sync mode.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_client::HomefeedClient;
use tandem_homefeed::{Pick, SyncMode};
use tandem_sandbox::{load, rollback, wait_until, SandboxBuilder};
use tandem_telemetry::catalogue;

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    mismatched: AtomicU64,
    retried: AtomicU64,
    by_version: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }
}

/// `workers` tasks send `per_worker` requests each (bounded), for users u0..u199.
fn drive(
    client: &HomefeedClient,
    tally: &Arc<Tally>,
    workers: usize,
    per_worker: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|w| {
            let c = client.clone();
            let t = tally.clone();
            tokio::spawn(async move {
                for k in 0..per_worker {
                    let user = format!("u{}", (w * 37 + k) % 200);
                    match c.candidates(&user, 20, k % 2 == 0, None).await {
                        Ok(r) => {
                            if r.mismatched() {
                                t.mismatched.fetch_add(1, Ordering::SeqCst);
                            }
                            if r.attempts > 1 {
                                t.retried.fetch_add(1, Ordering::SeqCst);
                            }
                            assert!(!r.items.is_empty());
                            *t.by_version
                                .lock()
                                .unwrap()
                                .entry(r.index_version.to_string())
                                .or_default() += 1;
                            t.ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            t.failed.fetch_add(1, Ordering::SeqCst);
                            t.errors.lock().unwrap().push(e.to_string());
                        }
                    }
                }
            })
        })
        .collect()
}

async fn finish(workers: Vec<tokio::task::JoinHandle<()>>) {
    for w in workers {
        w.await.unwrap();
    }
}

async fn reach(tally: &Arc<Tally>, n: u64) {
    let t = tally.clone();
    wait_until(Duration::from_secs(60), "traffic progress", || {
        let ok = t.ok() + t.failed.load(Ordering::SeqCst);
        async move { ok >= n }
    })
    .await;
}

fn report(name: &str, t: &Tally) {
    eprintln!(
        "{name}: {} ok, {} failed, {} mismatched, {} retried, by version {:?}",
        t.ok(),
        t.failed.load(Ordering::SeqCst),
        t.mismatched.load(Ordering::SeqCst),
        t.retried.load(Ordering::SeqCst),
        t.by_version.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_rollout_then_a_rollback_under_traffic_never_mixes_versions() {
    let sb = SandboxBuilder::new(&[1, 1, 1]).start().await;
    let tally = Arc::new(Tally::default());
    let workers = drive(&sb.client, &tally, 8, 900);
    reach(&tally, 800).await;
    load(&sb.hosts[0].url(), "v2").await;
    reach(&tally, 2_400).await;
    load(&sb.hosts[1].url(), "v2").await;
    // Hosts now serve v2, v2, v1: a partial rollout.
    reach(&tally, 4_400).await;
    rollback(&sb.hosts[0].url()).await;
    reach(&tally, 5_800).await;
    rollback(&sb.hosts[1].url()).await;
    finish(workers).await;
    report("partial rollout + rollback", &tally);
    assert_eq!(
        tally.failed.load(Ordering::SeqCst),
        0,
        "{:?}",
        tally.errors.lock().unwrap().first()
    );
    assert_eq!(tally.mismatched.load(Ordering::SeqCst), 0);
    assert_eq!(tally.ok(), 7_200);
    let by = tally.by_version.lock().unwrap();
    assert!(
        by.get("v1").copied().unwrap_or(0) > 0 && by.get("v2").copied().unwrap_or(0) > 0,
        "{by:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_flipping_between_handshake_and_search_is_retried_on_its_new_version() {
    // The hook flips the only host to v2 right after the first Embed (for v1) and before its
    // Search, every time: deterministic, no timing involved.
    let flipped = Arc::new(AtomicBool::new(false));
    let url_slot: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let (f, u) = (flipped.clone(), url_slot.clone());
    let sb = SandboxBuilder::new(&[1])
        .homefeed(move |cfg| {
            cfg.between_embed_and_search = Some(Arc::new(move |host: &str| {
                let (f, u, host) = (f.clone(), u.clone(), host.to_string());
                Box::pin(async move {
                    if !f.swap(true, Ordering::SeqCst) {
                        *u.lock().unwrap() = Some(host.clone());
                        load(&host, "v2").await;
                    }
                })
            }));
        })
        .start()
        .await;
    let r = sb.client.candidates("u1", 10, false, None).await.unwrap();
    assert!(flipped.load(Ordering::SeqCst));
    assert_eq!(
        url_slot.lock().unwrap().as_deref(),
        Some(sb.hosts[0].url().as_str())
    );
    assert_eq!(
        (
            r.index_version.to_string(),
            r.embedding_version.to_string(),
            r.attempts
        ),
        ("v2".to_string(), "v2".to_string(), 2)
    );
    assert_eq!(r.items.len(), 10);
    // The race is visible in the orchestrator's metrics: one refusal, one repeated handshake.
    let m = sb.orchestrator.metrics();
    assert_eq!(
        m.value(&catalogue::HF_VERSION_REFUSALS, &[("source", "ann")]),
        Some(1.0)
    );
    assert_eq!(m.value(&catalogue::HF_HANDSHAKE_RETRIES, &[]), Some(1.0));
    assert_eq!(
        m.value(&catalogue::HF_ANSWERS, &[("version", "v2")]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_on_a_version_the_user_tower_evicted_is_skipped() {
    // The user tower keeps only v2; host 0 still serves v1.
    let sb = SandboxBuilder::new(&[1, 2])
        .keep(1)
        .homefeed(|cfg| cfg.pick = Pick::RoundRobin)
        .start()
        .await;
    // Hosts pin what they serve, which keeps v1 in the user tower; drop the pins to stage a
    // user tower that lost it anyway (its own store, a failed load).
    std::fs::remove_dir_all(sb.dir.path().join("pins/models/tandem/v1")).unwrap();
    let ut = tandem_client::UserTowerClient::connect(
        &sb.user_tower.url(),
        &tandem_client::ClientOptions::default(),
    )
    .await
    .unwrap();
    wait_until(Duration::from_secs(30), "the user tower evicts v1", || {
        let ut = ut.clone();
        async move {
            ut.versions(None)
                .await
                .is_ok_and(|v| v.iter().all(|v| v.version.0 == 2))
        }
    })
    .await;
    let tally = Arc::new(Tally::default());
    finish(drive(&sb.client, &tally, 4, 250)).await;
    report("evicted version", &tally);
    assert_eq!(
        tally.failed.load(Ordering::SeqCst),
        0,
        "{:?}",
        tally.errors.lock().unwrap().first()
    );
    assert_eq!(tally.mismatched.load(Ordering::SeqCst), 0);
    assert_eq!(
        tally
            .by_version
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        vec!["v2".to_string()]
    );
    assert!(
        tally.retried.load(Ordering::SeqCst) > 0,
        "round-robin sends half the requests to the v1 host first"
    );
    let m = sb.orchestrator.metrics();
    let refused = m
        .value(&catalogue::HF_VERSION_REFUSALS, &[("source", "user_tower")])
        .unwrap_or(0.0);
    assert!(refused > 0.0, "the user tower's refusals are counted");
    assert_eq!(m.value(&catalogue::HF_FAILOVERS, &[]), Some(refused));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_host_costs_retries_not_failures() {
    let mut sb = SandboxBuilder::new(&[1, 1, 2])
        .homefeed(|cfg| cfg.pick = Pick::TwoChoices)
        .start()
        .await;
    let tally = Arc::new(Tally::default());
    let workers = drive(&sb.client, &tally, 8, 300);
    reach(&tally, 600).await;
    sb.hosts[1].kill();
    finish(workers).await;
    report("host crash", &tally);
    assert_eq!(
        tally.failed.load(Ordering::SeqCst),
        0,
        "{:?}",
        tally.errors.lock().unwrap().first()
    );
    assert_eq!(tally.mismatched.load(Ordering::SeqCst), 0);
    assert_eq!(tally.ok(), 2_400);
    // What a scrape would show: the dead host as unreachable, the others by version.
    let seen = sb.orchestrator.observe_hosts().await;
    assert_eq!(seen.iter().filter(|(_, v)| v.is_none()).count(), 1);
    let m = sb.orchestrator.metrics();
    assert_eq!(m.value(&catalogue::HF_HOSTS_UNREACHABLE, &[]), Some(1.0));
    for v in ["v1", "v2"] {
        assert_eq!(
            m.value(&catalogue::HF_HOSTS_PER_VERSION, &[("version", v)]),
            Some(1.0),
            "{v}"
        );
    }
    assert_eq!(m.value(&catalogue::HF_VERSIONS_LIVE, &[]), Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naive_mode_mixes_versions_where_sync_mode_never_does() {
    let sb = SandboxBuilder::new(&[1, 2])
        .homefeed(|cfg| cfg.sync = SyncMode::Naive)
        .start()
        .await;
    let tally = Arc::new(Tally::default());
    finish(drive(&sb.client, &tally, 4, 200)).await;
    report("naive", &tally);
    // Naive always embeds with the newest version (v2): every answer from the v1 host is mixed.
    assert!(tally.mismatched.load(Ordering::SeqCst) > 0);
    assert_eq!(tally.failed.load(Ordering::SeqCst), 0);
}
