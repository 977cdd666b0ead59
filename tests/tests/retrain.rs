//! Auto-retraining against a real in-process cluster (3 ANN hosts, user tower, orchestrator on
//! loopback): a drifted event stream produces a deployed v2 with zero mismatched answers during
//! the move; a bad candidate is rejected by the gate; a candidate that passes a permissive gate
//! but degrades live is rolled back by the canary; a crashed cycle and an interrupted one leave
//! the fleet on the version it served.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tandem_data::synth::SynthConfig;
use tandem_model::config::{ModelConfig, TrainConfig};
use tandem_registry::{Registry, MODELS};
use tandem_retrain::config::RetrainConfig;
use tandem_retrain::history::CycleRecord;
use tandem_retrain::{CycleOptions, Fault, Outcome, Retrainer};
use tandem_sandbox::scenario::{drift_ending, publish_trained, record, seed_event_log};
use tandem_sandbox::{Sandbox, SandboxBuilder, MODEL};
use tandem_types::ModelVersion;

fn small() -> (ModelConfig, TrainConfig) {
    (
        ModelConfig {
            dim: 16,
            id_dim: 16,
            feature_dim: 4,
            hidden: 32,
            history: 10,
            ..Default::default()
        },
        TrainConfig {
            epochs: 6,
            batch_size: 256,
            lr: 5e-3,
            patience: 2,
            ..Default::default()
        },
    )
}

/// A cluster whose three hosts serve v1 (trained on the older 70 % of a drifting log), with the
/// newer 30 % recorded live through the user tower.
async fn cluster() -> Sandbox {
    cluster_of(&[1, 1, 1], 1).await
}

/// [`cluster`] with `hosts` ANN hosts serving v1 split into `shards` (host i: shard i mod S).
async fn cluster_of(hosts: &[u64], shards: u32) -> Sandbox {
    // The log ends at the last week boundary before now, so every run trains on the same hours
    // and weekdays (the models read both) and the gate compares the same two models: ending
    // "now", the candidate's margin over the champion moved with the time of day the test ran.
    const WEEK: i64 = 7 * 86_400;
    let now = tandem_types::clock::now_unix() - 120;
    let d = drift_ending(
        &SynthConfig {
            users: 300,
            items: 400,
            events: 24_000,
            topics: 8,
            days: 10,
            drift: 0.8,
            seed: 5,
            ..Default::default()
        },
        0.3,
        now - now.rem_euclid(WEEK),
    );
    let seed = d.seed;
    let sb = SandboxBuilder::new(hosts)
        .bootstrap(move |root| {
            seed_event_log(root, &seed);
            let (m, t) = small();
            publish_trained(root, MODEL, ModelVersion(1), &seed, (&m, &t), shards);
        })
        .shards(shards)
        .start()
        .await;
    let (ok, bad) = record(&sb.user_tower.url(), &d.fresh, 500).await;
    assert_eq!(bad, 0, "fresh events rejected");
    assert_eq!(ok as usize, d.fresh.len());
    sb
}

fn config() -> RetrainConfig {
    let (model, train) = small();
    let mut c = RetrainConfig {
        model,
        train,
        ..Default::default()
    };
    c.canary.watch_seconds = 1.0;
    c.canary.probe_users = 100;
    c.canary.interval_ms = 100;
    c
}

fn retrainer(sb: &Sandbox, cfg: RetrainConfig, fault: Option<Fault>) -> Retrainer {
    let root = sb.dir.path().to_path_buf();
    let mut o = CycleOptions::new(root, MODEL, sb.events_dir());
    o.fleet = Some(sb.fleet());
    o.homefeed = Some(sb.homefeed.url());
    o.fault = fault;
    Retrainer::new(o, cfg)
}

async fn host_versions(sb: &Sandbox) -> Vec<String> {
    let mut out = Vec::new();
    for url in sb.host_urls() {
        out.push(
            tandem_sandbox::admin(&url)
                .metadata(None)
                .await
                .expect("metadata")
                .model_version
                .to_string(),
        );
    }
    out
}

fn published(sb: &Sandbox) -> Vec<ModelVersion> {
    Registry::open(sb.dir.path()).list(MODELS, MODEL).unwrap()
}

#[derive(Default)]
struct Traffic {
    ok: AtomicU64,
    failed: AtomicU64,
    mismatched: AtomicU64,
    by_version: Mutex<BTreeMap<String, u64>>,
}

/// Closed-loop GetCandidates traffic from two workers until `stop`.
fn traffic(
    sb: &Sandbox,
    stop: Arc<AtomicBool>,
) -> (Arc<Traffic>, Vec<tokio::task::JoinHandle<()>>) {
    let t = Arc::new(Traffic::default());
    let tasks = (0..2)
        .map(|w| {
            let c = sb.client.clone();
            let t = t.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut k = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    k += 1;
                    let user = format!("u{}", (w * 131 + k * 7) % 300);
                    match c.candidates(&user, 20, k.is_multiple_of(2), None).await {
                        Ok(r) => {
                            if r.mismatched() {
                                t.mismatched.fetch_add(1, Ordering::SeqCst);
                            }
                            *t.by_version
                                .lock()
                                .unwrap()
                                .entry(r.index_version.to_string())
                                .or_default() += 1;
                            t.ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => {
                            t.failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    (t, tasks)
}

fn explain(r: &CycleRecord) -> String {
    serde_json::to_string_pretty(r).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drifted_events_deploy_v2_across_the_fleet_with_zero_mismatched_answers() {
    let sb = cluster().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (t, tasks) = traffic(&sb, stop.clone());
    let deployer = retrainer(&sb, config(), None);
    let rec = deployer.run_cycle().await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(rec.outcome, Outcome::Deployed, "{}", explain(&rec));
    let scraped = deployer.metrics().render();
    assert!(
        scraped.contains("tandem_retrain_cycles_total{outcome=\"deployed\"} 1\n")
            && scraped.contains("tandem_retrain_serving_version 2\n"),
        "{scraped}"
    );
    assert_eq!(rec.version, Some(ModelVersion(2)));
    assert_eq!(host_versions(&sb).await, ["v2", "v2", "v2"]);
    assert!(rec.gate.iter().all(|d| d.passed));
    assert!(rec.candidate_metrics["recall@50"] > 0.0);
    assert!(
        !rec.champion_metrics.is_empty(),
        "the champion was evaluated too"
    );
    let by = t.by_version.lock().unwrap().clone();
    println!(
        "traffic during the cycle: {by:?}, failed {}; recall@50 candidate {:.4}, champion {:.4}",
        t.failed.load(Ordering::SeqCst),
        rec.candidate_metrics["recall@50"],
        rec.champion_metrics["recall@50"]
    );
    assert_eq!(t.mismatched.load(Ordering::SeqCst), 0);
    assert_eq!(t.failed.load(Ordering::SeqCst), 0);
    assert!(by.contains_key("v1") && by.contains_key("v2"), "{by:?}");
    // The canary watched the first host, then the whole fleet.
    let phases: Vec<&str> = rec.canary.iter().map(|c| c.phase.as_str()).collect();
    assert_eq!(phases, ["baseline", "canary", "fleet"]);
    // The cycle is in the history, and a second cycle right away has nothing new to learn.
    let r = retrainer(&sb, config(), None);
    assert_eq!(r.history().cycles().unwrap().len(), 1);
    let again = r.run_cycle().await;
    assert_eq!(again.outcome, Outcome::Skipped, "{}", explain(&again));
    assert!(r
        .metrics()
        .render()
        .contains("tandem_retrain_cycles_total{outcome=\"skipped\"} 1\n"));
    assert_eq!(again.champion, Some(ModelVersion(2)));
}

/// Over 2 shards × 2 replicas the candidate is published in the champion's layout (2 shards),
/// the canary is one replica of each shard (so v2 covers every shard from the first phase and
/// answers), and the rollout never leaves a request without a covering version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_sharded_fleet_the_candidate_keeps_the_layout_and_the_canary_covers_every_shard() {
    let sb = cluster_of(&[1, 1, 1, 1], 2).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (t, tasks) = traffic(&sb, stop.clone());
    // No drift here: the candidate scores level with the champion (seen: 0.3656 vs 0.3720
    // recall@50, just past the -0.005 tolerance), and this scenario is about the shard layout
    // and the canary, so the quality comparison lets it through.
    let mut cfg = config();
    cfg.gate.min_delta = -1.0;
    let rec = retrainer(&sb, cfg, None).run_cycle().await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(rec.outcome, Outcome::Deployed, "{}", explain(&rec));
    assert_eq!(host_versions(&sb).await, ["v2", "v2", "v2", "v2"]);
    let dir = sb.dir.path().join("indexes").join(MODEL).join("v2");
    let m: tandem_artifact::Manifest<tandem_index::artifact::IndexManifest> =
        tandem_artifact::open(&dir).unwrap();
    assert_eq!(m.meta.shard_count(), 2, "the champion's layout");
    // Canary: hosts 0 and 1 (shards 0 and 1), then the other two.
    let urls = sb.host_urls();
    let moved: Vec<&str> = rec.rollout.iter().map(|s| s.host.as_str()).collect();
    assert_eq!(
        moved,
        [&urls[0], &urls[1], &urls[2], &urls[3]],
        "{}",
        explain(&rec)
    );
    let canary = rec
        .canary
        .iter()
        .find(|c| c.phase == "canary")
        .expect("a canary phase");
    assert!(
        canary
            .answered_by
            .get(&ModelVersion(2))
            .copied()
            .unwrap_or(0)
            > 0,
        "the canary took traffic: {}",
        explain(&rec)
    );
    let by = t.by_version.lock().unwrap().clone();
    assert_eq!(t.failed.load(Ordering::SeqCst), 0, "{by:?}");
    assert_eq!(t.mismatched.load(Ordering::SeqCst), 0);
    assert!(by.contains_key("v1") && by.contains_key("v2"), "{by:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_trained_on_shuffled_item_ids_is_rejected_and_nothing_is_deployed() {
    let sb = cluster().await;
    let rec = retrainer(&sb, config(), Some(Fault::ShuffleTrainItems))
        .run_cycle()
        .await;
    assert_eq!(rec.outcome, Outcome::Rejected, "{}", explain(&rec));
    assert!(rec.reason.contains("vs_champion"), "{}", rec.reason);
    assert!(rec.version.is_none());
    assert_eq!(published(&sb), [ModelVersion(1)]);
    assert_eq!(host_versions(&sb).await, ["v1", "v1", "v1"]);
    let cycles = retrainer(&sb, config(), None).history().cycles().unwrap();
    assert_eq!(cycles[0].outcome, Outcome::Rejected);
    assert_eq!(cycles[0].reason, rec.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_passes_the_gate_but_fails_the_canary_is_rolled_back() {
    let sb = cluster().await;
    let mut cfg = config();
    cfg.gate.min_delta = -1.0;
    cfg.gate.min_coverage_ratio = 0.0;
    // A shuffled model's index measures 0.94–0.96 recall@10 (the parallel build varies): this
    // scenario is about the canary, so the gate lets every index through.
    cfg.gate.min_ann_recall = 0.0;
    let rec = retrainer(&sb, cfg, Some(Fault::ShuffleTrainItems))
        .run_cycle()
        .await;
    assert_eq!(rec.outcome, Outcome::RolledBack, "{}", explain(&rec));
    assert!(rec.reason.starts_with("canary failed"), "{}", rec.reason);
    assert_eq!(rec.version, Some(ModelVersion(2)));
    assert_eq!(host_versions(&sb).await, ["v1", "v1", "v1"]);
    assert_eq!(rec.rollback.len(), 1, "only the canary host had moved");
    let canary = &rec.canary[1];
    assert!(canary.hit_rate < rec.canary[0].hit_rate);
    assert_eq!(canary.mismatched, 0);

    // An interrupted cycle (the process died after moving a host) is settled on restart.
    tandem_sandbox::load(&sb.host_urls()[0], "v2").await;
    let r = retrainer(&sb, config(), None);
    let mut crashed = CycleRecord::new(2, 0);
    crashed.version = Some(ModelVersion(2));
    r.history().append(&crashed).unwrap();
    let settled = r.resume().await.unwrap().expect("an interrupted cycle");
    assert_eq!(settled.outcome, Outcome::Failed);
    assert!(settled.reason.contains("interrupted"), "{}", settled.reason);
    assert_eq!(host_versions(&sb).await, ["v1", "v1", "v1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_training_is_recorded_and_leaves_the_fleet_untouched() {
    let sb = cluster().await;
    let rec = retrainer(&sb, config(), Some(Fault::CrashTraining))
        .run_cycle()
        .await;
    assert_eq!(rec.outcome, Outcome::Failed);
    assert!(rec.reason.contains("training crashed"), "{}", rec.reason);
    assert_eq!(published(&sb), [ModelVersion(1)]);
    assert_eq!(host_versions(&sb).await, ["v1", "v1", "v1"]);
}
