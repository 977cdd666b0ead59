//! `tandem sim rollout`: the operator's proof. Starts an in-process cluster on loopback (two
//! model versions trained with different seeds), drives GetCandidates traffic while it rolls the
//! ANN hosts v1 → v2 one by one, forces a host to flip between handshake and search, rolls one
//! host back and kills one; then reports errors, mismatched answers, recall@K against each
//! user's exact top-K for the version that answered, and latency — for sync and naive modes.
//! With `--shards S --replicas R` the fleet is S shards × R replicas of sharded versions: the
//! same choreography keeps one version covering every shard at each step, the forced flip
//! moves a replica to the other version between Embed and Search, and the report sets the
//! merged recall beside what an unsharded index of the same version reaches.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tandem_artifact::version_dir;
use tandem_client::{AnnClient, ClientOptions, HomefeedClient};
use tandem_cluster::{wait_for, Cluster, ClusterBuilder};
use tandem_homefeed::{Pick, SyncMode};
use tandem_model::eval::top_k;
use tandem_model::{TwoTower, UserRequest};
use tandem_pipeline::publish_small_synthetic_sharded;
use tandem_types::clock::now_unix;
use tandem_types::stats::percentiles;
use tandem_types::{ModelVersion, MODELS};

const MODEL: &str = "tandem";
/// The in-process cluster's admin token (loopback only, gone when the simulation ends).
const TOKEN: &str = "sim";

#[derive(clap::Subcommand, Debug)]
pub enum Sim {
    /// Roll a fleet v1 → v2 under traffic with a forced mid-request flip, a rollback and a crash.
    Rollout(RolloutArgs),
    /// Inject faults into separate processes (full disk, corrupt versions, kill -9 while
    /// recording, loading and publishing, a stall) and report losses and recovery times.
    Faults(crate::cmd::faults::FaultsArgs),
}

#[derive(clap::Args, Debug)]
pub struct RolloutArgs {
    /// ANN hosts (at least 3) of an unsharded fleet.
    #[arg(long, default_value_t = 3)]
    pub hosts: usize,
    /// Split each version into this many index shards (2 or more); the fleet is then
    /// `--shards` × `--replicas` hosts and `--hosts` is not used.
    #[arg(long, default_value_t = 1)]
    pub shards: u32,
    /// Replicas of each shard (at least 2) with `--shards`.
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// GetCandidates requests per mode.
    #[arg(long, default_value_t = 10_000)]
    pub requests: usize,
    /// Candidates per request (the K of recall@K).
    #[arg(long, default_value_t = 20)]
    pub k: i32,
    #[arg(long)]
    pub json: bool,
}

impl RolloutArgs {
    fn fleet_size(&self) -> usize {
        if self.shards > 1 {
            self.shards as usize * self.replicas
        } else {
            self.hosts
        }
    }
}

struct Answer {
    user: String,
    index_version: ModelVersion,
    embedding_version: ModelVersion,
    items: Vec<String>,
    micros: f64,
}

pub fn run(s: Sim) -> Result<()> {
    let a = match s {
        Sim::Rollout(a) => a,
        Sim::Faults(a) => return crate::cmd::faults::run(a),
    };
    if a.shards == 0 {
        anyhow::bail!("--shards must be at least 1");
    }
    if a.shards > 1 && a.replicas < 2 {
        anyhow::bail!(
            "--replicas must be at least 2 with --shards (a shard must survive a kill and a rollback)"
        );
    }
    if a.shards == 1 && a.hosts < 3 {
        anyhow::bail!(
            "--hosts must be at least 3 (one to roll back, one to kill, one to keep serving)"
        );
    }
    if a.requests < 100 || a.k <= 0 {
        anyhow::bail!("--requests must be at least 100 and --k positive");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut modes = serde_json::Map::new();
    for mode in [SyncMode::Sync, SyncMode::Naive] {
        let report = rt.block_on(run_mode(&a, mode))?;
        modes.insert(format!("{mode:?}").to_lowercase(), report);
    }
    let out = serde_json::json!({
        "hosts": a.fleet_size(),
        "shards": a.shards,
        "replicas_per_shard": if a.shards > 1 { a.replicas } else { a.hosts },
        "requests_per_mode": a.requests,
        "k": a.k,
        "modes": modes,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} ANN hosts ({} shard(s)); recall@K against the exact top-K of the whole catalogue",
        a.fleet_size(),
        a.shards
    );
    println!(
        "{:<8}{:>10}{:>8}{:>12}{:>12}{:>12}{:>10}{:>10}",
        "mode", "requests", "errors", "mismatched", "recall@K", "unsharded", "p50 ms", "p99 ms"
    );
    for (name, r) in &modes {
        println!(
            "{name:<8}{:>10}{:>8}{:>12}{:>12.4}{:>12}{:>10.2}{:>10.2}",
            r["requests"].as_u64().unwrap_or(0),
            r["errors"].as_u64().unwrap_or(0),
            r["mismatched"].as_u64().unwrap_or(0),
            r["recall_at_k"].as_f64().unwrap_or(0.0),
            r["unsharded_recall_at_k"]
                .as_f64()
                .map_or("-".to_string(), |x| format!("{x:.4}")),
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

/// The cluster of one mode: v1 and v2 of a small model (different seeds), every host on v1,
/// and the orchestrator's between-embed-and-search hook wired to the forced flip.
struct SimCluster {
    _dir: tempfile::TempDir,
    cluster: Cluster,
    armed: Arc<AtomicBool>,
    flips: Arc<AtomicU64>,
}

async fn start(hosts: usize, shards: u32, mode: SyncMode) -> Result<SimCluster> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<()> {
        publish_small_synthetic_sharded(&root, MODEL, 1, shards)?;
        publish_small_synthetic_sharded(&root, MODEL, 2, shards)?;
        Ok(())
    })
    .await??;
    let armed = Arc::new(AtomicBool::new(false));
    let flips = Arc::new(AtomicU64::new(0));
    let (arm, count) = (armed.clone(), flips.clone());
    let opts = ClientOptions::default().with_admin_token(TOKEN);
    let cluster = ClusterBuilder::new(dir.path(), MODEL, &vec![ModelVersion(1); hosts])
        .admin_token(TOKEN)
        .measurement_hosts(mode == SyncMode::Naive)
        .homefeed(move |cfg| {
            cfg.sync = mode;
            cfg.pick = Pick::TwoChoices;
            // The forced race: once armed, the host in the middle of the next request (over
            // shards: that request's replica of shard 0) flips to the other version between
            // the request's Embed and its Search.
            cfg.between_embed_and_search = Some(Arc::new(move |host: &str| {
                let (arm, count, opts, host) =
                    (arm.clone(), count.clone(), opts.clone(), host.to_string());
                Box::pin(async move {
                    if arm.swap(false, Ordering::SeqCst) {
                        if flip(&host, &opts).await.is_ok() {
                            count.fetch_add(1, Ordering::SeqCst);
                        } else {
                            tracing::warn!(%host, "the forced flip failed");
                        }
                    }
                })
            }));
        })
        .shards(shards)
        .start()
        .await?;
    Ok(SimCluster {
        _dir: dir,
        cluster,
        armed,
        flips,
    })
}

/// Moves the host at `url` to the version it does not serve (v1 ↔ v2).
async fn flip(url: &str, opts: &ClientOptions) -> Result<()> {
    let c = AnnClient::lazy(url, opts)?;
    let now = c.metadata(None).await?.model_version;
    let to = if now == ModelVersion(2) {
        ModelVersion(1)
    } else {
        ModelVersion(2)
    };
    c.load(to, None).await?;
    Ok(())
}

/// `workers` tasks of `per` GetCandidates each; answers and errors are collected.
fn drive(
    client: &HomefeedClient,
    workers: usize,
    per: usize,
    k: i32,
    answers: &Arc<Mutex<Vec<Answer>>>,
    errors: &Arc<AtomicU64>,
    done: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|w| {
            let (c, answers, errors, done) = (
                client.clone(),
                answers.clone(),
                errors.clone(),
                done.clone(),
            );
            tokio::spawn(async move {
                for i in 0..per {
                    let user = format!("u{}", (w * 53 + i * 7) % 200);
                    let t = Instant::now();
                    match c.candidates(&user, k, false, None).await {
                        Ok(r) => answers.lock().expect("lock").push(Answer {
                            user,
                            index_version: r.index_version,
                            embedding_version: r.embedding_version,
                            items: r.items.into_iter().map(|(i, _)| i).collect(),
                            micros: t.elapsed().as_secs_f64() * 1e6,
                        }),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect()
}

async fn run_mode(a: &RolloutArgs, mode: SyncMode) -> Result<serde_json::Value> {
    let mut sim = start(a.fleet_size(), a.shards, mode).await?;
    let client = sim.cluster.homefeed_client()?;
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::new(Mutex::new(Vec::with_capacity(a.requests)));
    let errors = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let workers = 8;
    let per = a.requests / workers;
    let tasks = drive(&client, workers, per, a.k, &answers, &errors, &done);
    let total = (per * workers) as u64;
    let events = choreography(&mut sim, a.shards as usize, &done, total).await?;
    for t in tasks {
        t.await?;
    }
    let answers = std::mem::take(&mut *answers.lock().expect("lock"));
    let scored = score(&sim.cluster, &answers, a.k as usize, a.shards > 1)?;
    let mut lat: Vec<f64> = answers.iter().map(|a| a.micros / 1000.0).collect();
    let [p50, p99] = percentiles(&mut lat, [0.5, 0.99]);
    Ok(serde_json::json!({
        "requests": total,
        "answered": answers.len(),
        "errors": errors.load(Ordering::SeqCst),
        "mismatched": scored.mismatched,
        "recall_at_k": scored.recall,
        "unsharded_recall_at_k": scored.unsharded_recall,
        "p50_ms": p50,
        "p99_ms": p99,
        "answers_by_index_version": scored.by_version,
        "forced_flips": sim.flips.load(Ordering::SeqCst),
        "events": events,
    }))
}

/// The rolling upgrade under traffic, keyed to the share of requests done. Unsharded: host 0 →
/// v2, the forced flip armed, the other hosts → v2 one by one, host 0 rolled back, the last
/// host killed. Over `shards` (host `i` serves shard `i % shards`): the first replica of every
/// shard → v2 (v1 keeps its other replicas), the flip armed once both versions cover every
/// shard, the other replicas → v2, any flipped host back on v2, host 0 rolled back and the last
/// host killed — at every step some version has a live replica on every shard.
async fn choreography(
    sim: &mut SimCluster,
    shards: usize,
    done: &Arc<AtomicU64>,
    total: u64,
) -> Result<Vec<String>> {
    let at = |f: f64| (total as f64 * f) as u64;
    let reach = |n: u64| {
        let d = done.clone();
        async move {
            wait_for(Duration::from_secs(600), "traffic", || {
                let v = d.load(Ordering::SeqCst);
                async move { v >= n }
            })
            .await
        }
    };
    let admin = |url: &str| AnnClient::lazy(url, &sim.cluster.admin_options());
    let urls = sim.cluster.host_urls();
    let first = shards.max(1);
    let mut events = Vec::new();
    for (i, url) in urls.iter().enumerate().take(first) {
        reach(at(0.10 + 0.1 * i as f64 / first as f64)).await?;
        admin(url)?.load(ModelVersion(2), None).await?;
        events.push(format!("{url} → v2"));
    }
    reach(at(0.25)).await?;
    sim.armed.store(true, Ordering::SeqCst);
    events.push("forced flip armed".to_string());
    let rest = urls.len() - first;
    for (i, url) in urls.iter().enumerate().skip(first) {
        reach(at(0.25 + 0.3 * (i - first + 1) as f64 / rest as f64)).await?;
        admin(url)?.load(ModelVersion(2), None).await?;
        events.push(format!("{url} → v2"));
    }
    reach(at(0.60)).await?;
    for url in &urls {
        let c = admin(url)?;
        if c.metadata(None).await?.model_version != ModelVersion(2) {
            c.load(ModelVersion(2), None).await?;
            events.push(format!("{url} (flipped) → v2"));
        }
    }
    reach(at(0.70)).await?;
    admin(&urls[0])?.rollback(None).await?;
    events.push(format!("{} rolled back", urls[0]));
    reach(at(0.85)).await?;
    let last = urls.len() - 1;
    sim.cluster.hosts[last].kill();
    events.push(format!("{} killed", urls[last]));
    Ok(events)
}

/// What the answers were worth.
struct Scored {
    recall: f64,
    /// The same users' recall from an unsharded index of the answering version (sharded runs).
    unsharded_recall: Option<f64>,
    mismatched: u64,
    by_version: BTreeMap<ModelVersion, u64>,
}

/// Recall@k of every answer against the exact top-k of the version that answered (that
/// version's user embedding against all of its items, from the published artifacts), mismatched
/// answers, and answers per version. With `sharded`, the same recall from an unsharded HNSW
/// index of each version (default parameters) for the same answers, for comparison.
fn score(cluster: &Cluster, answers: &[Answer], k: usize, sharded: bool) -> Result<Scored> {
    struct Version {
        model: TwoTower,
        items: Vec<Vec<f32>>,
        /// An unsharded index over the catalogue (row 0 left out) and its item ids.
        whole: Option<(Box<dyn tandem_index::AnnIndex>, Vec<String>)>,
    }
    let mut versions: BTreeMap<ModelVersion, Version> = BTreeMap::new();
    for v in [ModelVersion(1), ModelVersion(2)] {
        let model = TwoTower::load(&version_dir(&cluster.root, MODELS, MODEL, v))?;
        let items = model.item.embed_all()?.to_vec2::<f32>()?;
        let whole = if sharded {
            let (flat, dim, ids) = tandem_pipeline::index::item_vectors(&model)?;
            let params = tandem_index::HnswParams::default();
            Some((tandem_index::build(flat, dim, &params)?, ids))
        } else {
            None
        };
        versions.insert(
            v,
            Version {
                model,
                items,
                whole,
            },
        );
    }
    let ts = now_unix();
    // Per (user, version): the exact top k, and the unsharded index's hits among them.
    let mut truth: HashMap<(String, ModelVersion), (HashSet<String>, f64)> = HashMap::new();
    let (mut hits, mut whole_hits) = (0.0, 0.0);
    let mut mismatched = 0u64;
    let mut by_version: BTreeMap<ModelVersion, u64> = BTreeMap::new();
    for ans in answers {
        if ans.index_version != ans.embedding_version {
            mismatched += 1;
        }
        *by_version.entry(ans.index_version).or_default() += 1;
        let key = (ans.user.clone(), ans.index_version);
        if !truth.contains_key(&key) {
            let v = &versions[&ans.index_version];
            let u = v
                .model
                .user
                .embed_requests(&[UserRequest {
                    user: &ans.user,
                    ts,
                    ..Default::default()
                }])?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let scores: Vec<f32> = v
                .items
                .iter()
                .map(|row| row.iter().zip(&u).map(|(x, y)| x * y).sum())
                .collect();
            let best: HashSet<String> = top_k(&scores, k, |i| i == 0)
                .into_iter()
                .map(|i| v.model.item.items.ids[i].clone())
                .collect();
            let whole = v.whole.as_ref().map_or(0.0, |(idx, ids)| {
                idx.search(&u, k, idx.ef_for(k))
                    .iter()
                    .filter(|(row, _)| best.contains(&ids[*row as usize]))
                    .count() as f64
                    / k as f64
            });
            truth.insert(key.clone(), (best, whole));
        }
        let (t, whole) = &truth[&key];
        hits += ans.items.iter().filter(|i| t.contains(*i)).count() as f64 / k as f64;
        whole_hits += whole;
    }
    let n = answers.len().max(1) as f64;
    Ok(Scored {
        recall: hits / n,
        unsharded_recall: sharded.then_some(whole_hits / n),
        mismatched,
        by_version,
    })
}
