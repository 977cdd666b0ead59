//! `tandem sim rollout`: the operator's proof. Starts an in-process cluster on loopback (two
//! model versions trained with different seeds), drives GetCandidates traffic while it rolls the
//! ANN hosts v1 → v2 one by one, forces a host to flip between handshake and search, rolls one
//! host back and kills one; then reports errors, mismatched answers, recall@K against each
//! user's exact top-K for the version that answered, and latency — for sync and naive modes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tandem_homefeed::{Pick, SyncMode};
use tandem_model::eval::top_k;
use tandem_model::{TwoTower, UserRequest};
use tandem_proto::homefeed::v1 as pb;
use tandem_sandbox::{load, rollback, wait_until, SandboxBuilder};

#[derive(clap::Subcommand, Debug)]
pub enum Sim {
    /// Roll a fleet v1 → v2 under traffic with a forced mid-request flip, a rollback and a crash.
    Rollout(RolloutArgs),
}

#[derive(clap::Args, Debug)]
pub struct RolloutArgs {
    /// ANN hosts (at least 3).
    #[arg(long, default_value_t = 3)]
    pub hosts: usize,
    /// GetCandidates requests per mode.
    #[arg(long, default_value_t = 10_000)]
    pub requests: usize,
    /// Candidates per request (the K of recall@K).
    #[arg(long, default_value_t = 20)]
    pub k: i32,
    #[arg(long)]
    pub json: bool,
}

struct Answer {
    user: String,
    index_version: String,
    embedding_version: String,
    items: Vec<String>,
    micros: f64,
}

pub fn run(s: Sim) -> Result<()> {
    let Sim::Rollout(a) = s;
    if a.hosts < 3 {
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
    let out = serde_json::json!({ "hosts": a.hosts, "requests_per_mode": a.requests, "k": a.k, "modes": modes });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:<8}{:>10}{:>8}{:>12}{:>12}{:>10}{:>10}",
        "mode", "requests", "errors", "mismatched", "recall@K", "p50 ms", "p99 ms"
    );
    for (name, r) in &modes {
        println!(
            "{name:<8}{:>10}{:>8}{:>12}{:>12.4}{:>10.2}{:>10.2}",
            r["requests"].as_u64().unwrap_or(0),
            r["errors"].as_u64().unwrap_or(0),
            r["mismatched"].as_u64().unwrap_or(0),
            r["recall_at_k"].as_f64().unwrap_or(0.0),
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

async fn run_mode(a: &RolloutArgs, mode: SyncMode) -> Result<serde_json::Value> {
    let armed = Arc::new(AtomicBool::new(false));
    let flips = Arc::new(AtomicU64::new(0));
    let (arm, count) = (armed.clone(), flips.clone());
    let mut sb = SandboxBuilder::new(&vec![1; a.hosts])
        .homefeed(move |cfg| {
            cfg.sync = mode;
            cfg.pick = Pick::TwoChoices;
            // The forced race: once armed, the host in the middle of the next request flips to
            // v2 between that request's Embed and its Search.
            cfg.between_embed_and_search = Some(Arc::new(move |host: &str| {
                let (arm, count, host) = (arm.clone(), count.clone(), host.to_string());
                Box::pin(async move {
                    if arm.swap(false, Ordering::SeqCst) {
                        load(&host, "v2").await;
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                })
            }));
        })
        .start()
        .await;
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::new(Mutex::new(Vec::with_capacity(a.requests)));
    let errors = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let workers = 8;
    let per = a.requests / workers;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (mut c, answers, errors, done, k) = (
            sb.client.clone(),
            answers.clone(),
            errors.clone(),
            done.clone(),
            a.k,
        );
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let user = format!("u{}", (w * 53 + i * 7) % 200);
                let t = Instant::now();
                match c
                    .get_candidates(pb::GetCandidatesRequest {
                        user_id: user.clone(),
                        k,
                        exclude_seen: false,
                    })
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        answers.lock().expect("lock").push(Answer {
                            user,
                            index_version: r.model_version,
                            embedding_version: r.embedding_version,
                            items: r.items.into_iter().map(|i| i.item_id).collect(),
                            micros: t.elapsed().as_secs_f64() * 1e6,
                        });
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let total = (per * workers) as u64;
    let at = |f: f64| (total as f64 * f) as u64;
    let reach = |n: u64| {
        let d = done.clone();
        async move {
            wait_until(Duration::from_secs(600), "traffic", || {
                let v = d.load(Ordering::SeqCst);
                async move { v >= n }
            })
            .await
        }
    };
    let urls: Vec<String> = sb.hosts.iter().map(|h| h.url()).collect();
    let mut events = Vec::new();
    reach(at(0.10)).await;
    load(&urls[0], "v2").await;
    events.push(format!("{} → v2", urls[0]));
    reach(at(0.25)).await;
    armed.store(true, Ordering::SeqCst);
    events.push("forced flip armed".to_string());
    for (i, url) in urls.iter().enumerate().skip(1) {
        reach(at(0.25 + 0.3 * i as f64 / urls.len() as f64)).await;
        load(url, "v2").await;
        events.push(format!("{url} → v2"));
    }
    reach(at(0.70)).await;
    rollback(&urls[0]).await;
    events.push(format!("{} rolled back", urls[0]));
    reach(at(0.85)).await;
    let last = sb.hosts.len() - 1;
    sb.hosts[last].kill();
    events.push(format!("{} killed", urls[last]));
    for t in tasks {
        t.await?;
    }

    // Exact ground truth per (user, version): that version's user embedding against all of that
    // version's items, computed offline from the published artifacts.
    let models = sb.models();
    let answers = std::mem::take(&mut *answers.lock().expect("lock"));
    let mut truth: HashMap<(String, String), HashSet<String>> = HashMap::new();
    let ts = tandem_usertower::service::now_secs();
    let mut item_embs: BTreeMap<String, Vec<Vec<f32>>> = BTreeMap::new();
    for (v, m) in &models {
        item_embs.insert(v.clone(), m.item.embed_all()?.to_vec2::<f32>()?);
    }
    let mut hits = 0.0;
    let mut mismatched = 0u64;
    let mut by_version: BTreeMap<String, u64> = BTreeMap::new();
    for ans in &answers {
        if ans.index_version != ans.embedding_version {
            mismatched += 1;
        }
        *by_version.entry(ans.index_version.clone()).or_default() += 1;
        let key = (ans.user.clone(), ans.index_version.clone());
        if !truth.contains_key(&key) {
            let m: &TwoTower = &models[&ans.index_version];
            let u = m
                .user
                .embed_requests(&[UserRequest {
                    user: &ans.user,
                    history: vec![],
                    ts,
                    features: None,
                }])?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let scores: Vec<f32> = item_embs[&ans.index_version]
                .iter()
                .map(|row| row.iter().zip(&u).map(|(x, y)| x * y).sum())
                .collect();
            let best: HashSet<String> = top_k(&scores, a.k as usize, |i| i == 0)
                .into_iter()
                .map(|i| m.item.items.ids[i].clone())
                .collect();
            truth.insert(key.clone(), best);
        }
        let t = &truth[&key];
        hits += ans.items.iter().filter(|i| t.contains(*i)).count() as f64 / a.k as f64;
    }
    let mut lat: Vec<f64> = answers.iter().map(|a| a.micros).collect();
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
            / 1000.0
    };
    Ok(serde_json::json!({
        "requests": total,
        "answered": answers.len(),
        "errors": errors.load(Ordering::SeqCst),
        "mismatched": mismatched,
        "recall_at_k": hits / answers.len().max(1) as f64,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "answers_by_index_version": by_version,
        "forced_flips": flips.load(Ordering::SeqCst),
        "events": events,
    }))
}
