//! `tandem demo`: the whole system on the embedded default dataset, in one process.
//!
//! Synthesises a drifting engagement log anchored at the present; trains v1 on its older part and
//! indexes it; starts the user tower (its event log seeded with that part), N ANN hosts and the
//! orchestrator on loopback; serves paced GetCandidates traffic; records the newer part of the
//! log live through the user tower; runs one retrain cycle (candidate vs the serving v1 on the
//! same held-out slice, gate, publish, canary-watched rollout); and reports quality, latency,
//! versions over time and mismatched answers (which must be 0).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tandem_client::HomefeedClient;
use tandem_cluster::{record, Cluster, ClusterBuilder};
use tandem_data::drift::{drift, seed_event_log, Fresh};
use tandem_data::synth::SynthConfig;
use tandem_data::{EventColumns, EventLog, Protocol};
use tandem_index::HnswParams;
use tandem_model::config::{ModelConfig, TrainConfig};
use tandem_model::eval::{metrics, ItemCosine, MostPopular, Recommender};
use tandem_model::train::TrainInput;
use tandem_pipeline::{train_and_publish, IndexSpec, TrainJob};
use tandem_retrain::cycle::{eval_set, holdout, window};
use tandem_retrain::{CycleOptions, CycleRecord, Outcome, RetrainConfig, Retrainer};
use tandem_types::stats::percentiles;
use tandem_types::ModelVersion;

const MODEL: &str = "tandem";
/// The in-process cluster's admin token (loopback only, gone when the demo ends).
const TOKEN: &str = "demo";

use crate::args::print_json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Working directory; the cluster's artifacts and event log go to <out>/cluster (replaced on
    /// every run).
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    #[arg(long, default_value_t = SynthConfig::default().seed)]
    pub seed: u64,
    /// ANN hosts.
    #[arg(long, default_value_t = 3)]
    pub hosts: usize,
    /// GetCandidates requests per second during the run.
    #[arg(long, default_value_t = 100.0)]
    pub rps: f64,
    /// Seconds the canary watches each rollout phase.
    #[arg(long, default_value_t = 5.0)]
    pub watch_seconds: f64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Answers of one second of traffic.
#[derive(Default, Clone, serde::Serialize)]
struct Second {
    by_version: BTreeMap<ModelVersion, u64>,
    errors: u64,
    mismatched: u64,
}

#[derive(Default)]
struct Traffic {
    seconds: Vec<Second>,
    latency_ms: Vec<f64>,
}

fn model_config() -> (ModelConfig, TrainConfig) {
    (
        ModelConfig::default(),
        TrainConfig {
            epochs: 8,
            ..Default::default()
        },
    )
}

pub fn run(a: Args) -> Result<()> {
    if a.hosts == 0 || a.rps.is_nan() || a.rps <= 0.0 {
        bail!("--hosts and --rps must be positive");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(demo(a))
}

type Say = Arc<dyn Fn(&str) + Send + Sync>;

/// What the cluster was started from.
struct Started {
    cluster: Cluster,
    synth: SynthConfig,
    users: Vec<String>,
    seeded: usize,
    fresh: Vec<Fresh>,
    v1_seconds: f64,
}

async fn demo(a: Args) -> Result<()> {
    let started = Instant::now();
    // Progress goes to stderr in both modes: with --json, stdout carries only the report.
    let say: Say = Arc::new(move |msg: &str| {
        eprintln!("[{:>5.1}s] {msg}", started.elapsed().as_secs_f64());
    });
    let root = a.out.join("cluster");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    let s = start_cluster(&a, &root, &say).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = Arc::new(Mutex::new(Traffic::default()));
    let driver = tokio::spawn(drive(
        s.cluster.homefeed_client()?,
        s.users.clone(),
        a.rps,
        stop.clone(),
        traffic.clone(),
        started,
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;

    say(&format!(
        "recording {} newer engagements (interests have drifted) through the user tower",
        s.fresh.len()
    ));
    let t = Instant::now();
    let (accepted, rejected) = record(&s.cluster.user_tower.url(), &s.fresh, 1000).await?;
    let record_seconds = t.elapsed().as_secs_f64();
    if rejected > 0 {
        bail!("the user tower rejected {rejected} of the fresh events");
    }

    let cfg = retrain_config(&a);
    let mut opts = CycleOptions::new(root.clone(), MODEL, s.cluster.events_dir());
    opts.fleet = Some(s.cluster.fleet()?);
    opts.homefeed = Some(s.cluster.homefeed.url());
    let say_cycle = say.clone();
    opts.say = Arc::new(move |m| say_cycle(m));
    opts.training_progress = true;
    let retrainer = Retrainer::new(opts, cfg.clone());
    let cycle_started = started.elapsed().as_secs_f64();
    let rec = retrainer.run_cycle().await;
    let cycle_finished = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    driver.await?;

    let (quality, heldout_users) = quality(&s.cluster, &cfg, &rec)?;
    let tr = std::mem::take(&mut *traffic.lock().unwrap());
    let mut lat = tr.latency_ms.clone();
    let [p50, p99] = percentiles(&mut lat, [0.5, 0.99]);
    let requests: u64 = tr
        .seconds
        .iter()
        .map(|s| s.by_version.values().sum::<u64>() + s.errors)
        .sum();
    let errors: u64 = tr.seconds.iter().map(|s| s.errors).sum();
    let mismatched: u64 = tr.seconds.iter().map(|s| s.mismatched).sum();
    let hosts_after: Vec<String> = s
        .cluster
        .fleet()?
        .hosts()
        .await
        .into_iter()
        .map(|h| match h.model_version {
            Some(v) if h.up => v.to_string(),
            _ => format!("down ({})", h.error),
        })
        .collect();
    let out = serde_json::json!({
        "artifacts": root,
        "data": {"users": s.synth.users, "items": s.synth.items, "seeded_events": s.seeded, "recorded_events": accepted, "record_seconds": record_seconds},
        "v1_train_seconds": s.v1_seconds,
        "cycle": rec,
        "cycle_window_seconds": [cycle_started, cycle_finished],
        "heldout_users": heldout_users,
        "quality": quality,
        "traffic": {"requests": requests, "errors": errors, "mismatched": mismatched, "p50_ms": p50, "p99_ms": p99, "rps": a.rps},
        "timeline": tr.seconds,
        "hosts_after": hosts_after,
        "seconds": started.elapsed().as_secs_f64(),
    });
    if a.json {
        print_json(&out)?;
    } else {
        print_report(&out, &tr.seconds);
    }
    if mismatched > 0 {
        bail!("{mismatched} answers mixed versions: the anytime-sync invariant was broken");
    }
    if rec.outcome != Outcome::Deployed {
        bail!(
            "the retrain cycle ended {}: {}",
            rec.outcome.as_str(),
            rec.reason
        );
    }
    Ok(())
}

/// Synthesises the drifting log, seeds the event log with its older half, trains and indexes
/// v1 on that half and starts the cluster on it.
async fn start_cluster(a: &Args, root: &Path, say: &Say) -> Result<Started> {
    let synth = SynthConfig {
        seed: a.seed,
        days: 14,
        ..Default::default()
    };
    say(&format!(
        "synthesising {} users, {} items, {} events over {} days ending now",
        synth.users, synth.items, synth.events, synth.days
    ));
    // v1 learns from the first half; the second half, where interests and the catalogue have
    // moved on, arrives live.
    let d = drift(&synth, 0.5);
    let users: Vec<String> = d.seed.users.names().to_vec();
    let seeded = d.seed.len();
    say(&format!(
        "training v1 on the older {seeded} events, indexing it, starting {} ANN hosts, the user tower and the orchestrator",
        a.hosts
    ));
    let (mcfg, tcfg) = model_config();
    let (dir, seed) = (root.to_path_buf(), d.seed);
    let v1_seconds = tokio::task::spawn_blocking(move || -> Result<f64> {
        seed_event_log(&dir.join("events"), &seed)?;
        let t = train_and_publish(TrainJob {
            root: &dir,
            name: MODEL,
            version: Some(ModelVersion(1)),
            input: TrainInput {
                log: &seed,
                user_features: None,
                item_features: None,
                validation: Some(Protocol::Global),
            },
            model: &mcfg,
            train: &tcfg,
            extra: serde_json::json!({}),
            index: Some(IndexSpec {
                params: HnswParams::default(),
                recall_queries: 500,
                query_log: &seed,
                shards: 1,
            }),
            // One line per epoch on stderr (the bar itself only on a terminal): v1's training
            // is the demo's longest quiet stretch.
            progress: true,
        })?;
        Ok(t.report.seconds)
    })
    .await??;
    let cluster = ClusterBuilder::new(root, MODEL, &vec![ModelVersion(1); a.hosts])
        .admin_token(TOKEN)
        .start()
        .await?;
    say(&format!(
        "cluster up: user tower {}, hosts {}, homefeed {}",
        cluster.user_tower.url(),
        cluster.host_urls().join(" "),
        cluster.homefeed.url()
    ));
    Ok(Started {
        cluster,
        synth,
        users,
        seeded,
        fresh: d.fresh,
        v1_seconds,
    })
}

fn retrain_config(a: &Args) -> RetrainConfig {
    let (mcfg, tcfg) = model_config();
    let mut cfg = RetrainConfig {
        model: mcfg,
        train: tcfg,
        ..Default::default()
    };
    cfg.canary.watch_seconds = a.watch_seconds;
    cfg.rollout.pause_ms = 1000;
    cfg
}

/// Metrics by recommender name.
type Quality = BTreeMap<String, BTreeMap<String, f64>>;

/// The cycle's candidate and champion metrics beside the baselines, all on the very slice the
/// gate used, and how many held-out users that slice has.
fn quality(cluster: &Cluster, cfg: &RetrainConfig, rec: &CycleRecord) -> Result<(Quality, usize)> {
    let log = EventLog::read(&cluster.events_dir(), &EventColumns::default())?;
    let win = window(&log, cfg.window.days);
    let split = holdout(&win, cfg.window.holdout_fraction)?;
    let set = eval_set(&win, &split, cfg);
    let mut quality = BTreeMap::new();
    if let Some(v) = rec.version {
        quality.insert(format!("{v} (retrained)"), rec.candidate_metrics.clone());
    }
    if let Some(v) = rec.champion {
        quality.insert(format!("{v} (serving)"), rec.champion_metrics.clone());
    }
    let baselines: Vec<Box<dyn Recommender>> =
        vec![Box::new(MostPopular), Box::new(ItemCosine::default())];
    for r in &baselines {
        quality.insert(r.name(), metrics(&set, &r.recommend(&set, 100)?).values);
    }
    Ok((quality, set.users.len()))
}

/// Paced GetCandidates traffic (two workers) until `stop`, tallied per second since `t0`.
async fn drive(
    client: HomefeedClient,
    users: Vec<String>,
    rps: f64,
    stop: Arc<AtomicBool>,
    out: Arc<Mutex<Traffic>>,
    t0: Instant,
) {
    let workers = 2;
    let gap = Duration::from_secs_f64(workers as f64 / rps);
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let c = client.clone();
            let users = users.clone();
            let stop = stop.clone();
            let out = out.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(gap);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut k: usize = w;
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    k = k.wrapping_mul(2_654_435_761).wrapping_add(12_345) % 1_000_003;
                    let user = users[k % users.len()].clone();
                    let t = Instant::now();
                    let r = c.candidates(&user, 20, true, None).await;
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    let sec = t0.elapsed().as_secs() as usize;
                    let mut o = out.lock().unwrap();
                    if o.seconds.len() <= sec {
                        o.seconds.resize(sec + 1, Second::default());
                    }
                    match r {
                        Ok(r) => {
                            let s = &mut o.seconds[sec];
                            if r.mismatched() {
                                s.mismatched += 1;
                            }
                            *s.by_version.entry(r.index_version).or_default() += 1;
                            o.latency_ms.push(ms);
                        }
                        Err(_) => o.seconds[sec].errors += 1,
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

fn print_report(out: &serde_json::Value, seconds: &[Second]) {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let c = &out["cycle"];
    println!("\nTandem demo — the embedded synthetic dataset, a live in-process cluster");
    println!(
        "data       {} users, {} items; {} events seeded, {} recorded live through the user tower in {:.1}s",
        out["data"]["users"],
        out["data"]["items"],
        out["data"]["seeded_events"],
        out["data"]["recorded_events"],
        f(&out["data"]["record_seconds"])
    );
    println!(
        "retrain    cycle {}: {} {} — {}",
        c["cycle"],
        c["outcome"].as_str().unwrap_or(""),
        c["version"].as_str().unwrap_or(""),
        c["reason"].as_str().unwrap_or("")
    );
    for d in c["gate"].as_array().into_iter().flatten() {
        println!(
            "  gate     {} {:<16} {}",
            if d["passed"].as_bool() == Some(true) {
                "pass"
            } else {
                "FAIL"
            },
            d["rule"].as_str().unwrap_or(""),
            d["reason"].as_str().unwrap_or("")
        );
    }
    for r in c["canary"].as_array().into_iter().flatten() {
        // The judged reason already states the hit rate against the baseline (or what failed).
        let reason = r["reason"].as_str().filter(|s| !s.is_empty());
        let judged = match reason {
            Some(why) => why.to_string(),
            None => format!("hit rate {:.3}", f(&r["hit_rate"])),
        };
        println!(
            "  watched  {:<8} {} probes: {judged}; {} errors, {} mismatched, p99 {:.1} ms",
            r["phase"].as_str().unwrap_or(""),
            r["requests"],
            r["errors"],
            r["mismatched"],
            f(&r["p99_ms"]),
        );
    }
    println!(
        "\nquality on the held-out slice (the last 10 % of the window, {} users)",
        out["heldout_users"]
    );
    println!(
        "  {:<16}{:>11}{:>11}{:>11}{:>13}",
        "", "recall@10", "recall@50", "ndcg@10", "coverage@10"
    );
    for (name, m) in out["quality"].as_object().into_iter().flatten() {
        println!(
            "  {name:<16}{:>11.4}{:>11.4}{:>11.4}{:>13.4}",
            f(&m["recall@10"]),
            f(&m["recall@50"]),
            f(&m["ndcg@10"]),
            f(&m["coverage@10"])
        );
    }
    let t = &out["traffic"];
    println!(
        "\ntraffic    {} GetCandidates at {} rps: {} errors, {} mismatched, p50 {:.2} ms, p99 {:.2} ms",
        t["requests"],
        t["rps"],
        t["errors"],
        t["mismatched"],
        f(&t["p50_ms"]),
        f(&t["p99_ms"])
    );
    println!(
        "versions over time (answers per index version; the retrain cycle ran from {:.0}s to {:.0}s)",
        f(&out["cycle_window_seconds"][0]),
        f(&out["cycle_window_seconds"][1])
    );
    // 5-second buckets; consecutive buckets answered by the same set of versions are merged.
    type Row = (usize, usize, BTreeMap<ModelVersion, u64>, u64, u64);
    let mut rows: Vec<Row> = Vec::new();
    for (i, chunk) in seconds.chunks(5).enumerate() {
        let mut by: BTreeMap<ModelVersion, u64> = BTreeMap::new();
        let (mut e, mut m) = (0, 0);
        for s in chunk {
            for (v, n) in &s.by_version {
                *by.entry(*v).or_default() += n;
            }
            e += s.errors;
            m += s.mismatched;
        }
        if by.is_empty() && e == 0 {
            continue;
        }
        let (from, to) = (i * 5, i * 5 + chunk.len());
        match rows.last_mut() {
            Some(last) if by.len() == 1 && last.2.len() == 1 && last.2.keys().eq(by.keys()) => {
                last.1 = to;
                for (v, n) in by {
                    *last.2.entry(v).or_default() += n;
                }
                last.3 += e;
                last.4 += m;
            }
            _ => rows.push((from, to, by, e, m)),
        }
    }
    for (from, to, by, e, m) in rows {
        let mix: Vec<String> = by.iter().map(|(v, n)| format!("{v}:{n}")).collect();
        println!(
            "  {from:>4}–{to:<4}s  {:<22} errors {e}  mismatched {m}",
            mix.join(" ")
        );
    }
    println!(
        "hosts now  {}",
        out["hosts_after"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "total {:.1}s; artifacts and event log in {} (try: tandem history --artifacts {})",
        f(&out["seconds"]),
        out["artifacts"].as_str().unwrap_or(""),
        out["artifacts"].as_str().unwrap_or("")
    );
}
