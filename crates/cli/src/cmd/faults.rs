//! `tandem sim faults`: fault injection against separate processes. Each scenario starts real
//! `tandem serve …` children on loopback over a small store (two synthetic versions), injects one
//! fault — a full disk, corrupt versions, `kill -9` while recording, loading or publishing, a
//! SIGSTOP stall — and measures what was lost and how long recovery took.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tandem_client::{AnnClient, ClientOptions, EngagementEvent, HomefeedClient, UserTowerClient};
use tandem_data::events::EventLog;
use tandem_types::{ModelVersion, MODELS};

#[derive(clap::Args, Debug)]
pub struct FaultsArgs {
    /// Work directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// A `tandem serve …` child, SIGKILLed when dropped.
struct Proc {
    child: Child,
    addr: String,
}

impl Proc {
    fn spawn(args: &[&str]) -> Result<Proc> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .env("TANDEM_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut reader = BufReader::new(child.stderr.take().context("child stderr")?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let Some((_, addr)) = line.trim().split_once(" listening on ") else {
            let _ = child.kill();
            bail!("tandem {} did not start: {}", args.join(" "), line.trim());
        };
        let addr = format!("http://{addr}");
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        Ok(Proc { child, addr })
    }

    fn signal(&self, sig: &str) -> Result<()> {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()?
            .success();
        if !ok {
            bail!("kill {sig} failed");
        }
        Ok(())
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn user_tower(store: &Path, log: &Path, extra: &[&str]) -> Result<Proc> {
    let mut args = vec![
        "serve",
        "user-tower",
        "--artifacts",
        s(store),
        "--event-log",
        s(log),
        "--listen",
        "127.0.0.1:0",
        "--poll-ms",
        "50",
        "--fsync",
        "always",
    ];
    args.extend_from_slice(extra);
    Proc::spawn(&args)
}

fn ann_host(store: &Path, extra: &[&str]) -> Result<Proc> {
    let mut args = vec![
        "serve",
        "ann",
        "--artifacts",
        s(store),
        "--listen",
        "127.0.0.1:0",
        "--admin-token",
        "faults",
    ];
    args.extend_from_slice(extra);
    Proc::spawn(&args)
}

/// An orchestrator in front of one host and the user tower.
fn homefeed(host: &Proc, ut: &Proc, extra: &[&str]) -> Result<Proc> {
    let mut args = vec![
        "serve",
        "homefeed",
        "--listen",
        "127.0.0.1:0",
        "--ann-hosts",
        &host.addr,
        "--user-tower",
        &ut.addr,
    ];
    args.extend_from_slice(extra);
    Proc::spawn(&args)
}

fn opts() -> ClientOptions {
    ClientOptions::default().with_admin_token("faults")
}

fn event(n: u64) -> EngagementEvent {
    EngagementEvent {
        user_id: format!("u{}", n % 97),
        item_id: format!("i{}-{}", n % 300, "x".repeat(120)),
        timestamp: 0,
        action: "click".into(),
        weight: 0.0,
    }
}

/// Retries `f` until it succeeds; returns the milliseconds it took.
async fn until_ok<F, Fut, T, E>(mut f: F, limit: Duration) -> Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, E>>,
    E: std::fmt::Display,
{
    let started = Instant::now();
    loop {
        match f().await {
            Ok(_) => return Ok(started.elapsed().as_secs_f64() * 1e3),
            Err(e) if started.elapsed() > limit => bail!("not recovered after {limit:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn logged(log: &Path) -> u64 {
    EventLog::read(log, &Default::default()).map_or(0, |l| l.len() as u64)
}

/// Writers send batches until the user tower dies; returns the events it acknowledged.
async fn kill9_while_recording(store: &Path, dir: &Path) -> Result<Value> {
    let log = dir.join("record-log");
    let mut ut = user_tower(store, &log, &[])?;
    let client = UserTowerClient::connect(&ut.addr, &ClientOptions::default()).await?;
    let acked = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let (c, acked, next) = (client.clone(), acked.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let base = next.fetch_add(20, Ordering::Relaxed);
                    let batch = (base..base + 20).map(event).collect();
                    match c.record_batch(batch, Some(Duration::from_secs(2))).await {
                        Ok(r) => acked.fetch_add(r.accepted, Ordering::Relaxed),
                        Err(_) => break,
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ut.kill9();
    for w in writers {
        w.await?;
    }
    let started = Instant::now();
    let ut = user_tower(store, &log, &[])?;
    let c = UserTowerClient::connect(&ut.addr, &ClientOptions::default()).await?;
    until_ok(|| c.versions(None), Duration::from_secs(60)).await?;
    let (acked, recovered) = (acked.load(Ordering::Relaxed), logged(&log));
    Ok(json!({
        "events_acked": acked,
        "events_recovered": recovered,
        "acked_lost": acked.saturating_sub(recovered),
        // Written, but the acknowledgement died with the process (clients retry: at least once).
        "unacked_persisted": recovered.saturating_sub(acked),
        "restart_to_serving_ms": started.elapsed().as_secs_f64() * 1e3,
    }))
}

/// The event log on a 256 KiB tmpfs (needs root to mount).
async fn disk_full(store: &Path, dir: &Path) -> Result<Value> {
    let log = dir.join("full-log");
    std::fs::create_dir_all(&log)?;
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs", s(&log)])
        .output()?;
    if !mounted.status.success() {
        return Ok(
            json!({"skipped": format!("mounting a tmpfs needs root: {}", String::from_utf8_lossy(&mounted.stderr).trim())}),
        );
    }
    let result = disk_full_on(store, &log).await;
    let _ = Command::new("umount").args(["-l", s(&log)]).status();
    result
}

async fn disk_full_on(store: &Path, log: &Path) -> Result<Value> {
    std::fs::write(log.join("ballast"), vec![0u8; 96 * 1024])?;
    let mut ut = user_tower(store, log, &[])?;
    let c = UserTowerClient::connect(&ut.addr, &ClientOptions::default()).await?;
    let (mut acked, mut failed, mut n) = (0u64, 0u64, 0u64);
    while failed < 5 && n < 200_000 {
        match c.record_batch((n..n + 20).map(event).collect(), None).await {
            Ok(r) => acked += r.accepted,
            Err(_) => failed += 1,
        }
        n += 20;
    }
    let consistent_when_full = logged(log) == acked;
    let reads_served = c.versions(None).await.is_ok();
    std::fs::remove_file(log.join("ballast"))?;
    let resumed = c.record_batch((0..10).map(event).collect(), None).await;
    acked += resumed.as_ref().map_or(0, |r| r.accepted);
    ut.kill9();
    let started = Instant::now();
    let ut = user_tower(store, log, &[])?;
    let c = UserTowerClient::connect(&ut.addr, &ClientOptions::default()).await?;
    until_ok(|| c.versions(None), Duration::from_secs(60)).await?;
    let recovered = logged(log);
    Ok(json!({
        "events_acked": acked,
        "batches_refused": failed,
        "log_equals_acked_when_full": consistent_when_full,
        "reads_served_when_full": reads_served,
        "writes_resumed_with_space": resumed.is_ok(),
        "events_recovered_after_restart": recovered,
        "acked_lost": acked.saturating_sub(recovered),
        "restart_to_serving_ms": started.elapsed().as_secs_f64() * 1e3,
    }))
}

/// Copies `<kind>/tandem/<from>` into place as `to`, through a hidden directory.
fn copy_version(store: &Path, kind: &str, from: &str, to: u64, corrupt: bool) -> Result<()> {
    let series = store.join(kind).join("tandem");
    let tmp = series.join(format!(".tmp-faults-{to}"));
    let ok = Command::new("cp")
        .args(["-r", s(&series.join(from)), s(&tmp)])
        .status()?
        .success();
    if !ok {
        bail!("cp failed");
    }
    if corrupt {
        for e in std::fs::read_dir(&tmp)? {
            let path = e?.path();
            if path
                .extension()
                .is_some_and(|x| x == "safetensors" || x == "bin")
            {
                let mut b = std::fs::read(&path)?;
                let mid = b.len() / 2;
                b[mid] ^= 0xff;
                std::fs::write(&path, b)?;
            }
        }
    }
    std::fs::rename(&tmp, series.join(ModelVersion(to).to_string()))?;
    Ok(())
}

/// Traffic through the orchestrator in the background: (requests, failures).
fn traffic(
    feed: HomefeedClient,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let (mut n, mut failed) = (0u64, 0u64);
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let user = format!("u{}", n % 97);
            if feed
                .candidates(&user, 10, false, Some(Duration::from_millis(500)))
                .await
                .is_err()
            {
                failed += 1;
            }
        }
        (n, failed)
    })
}

/// Corrupt and copied versions appear while traffic flows.
async fn corrupt_versions(store: &Path, dir: &Path) -> Result<Value> {
    let log = dir.join("corrupt-log");
    let ut = user_tower(store, &log, &["--keep", "2"])?;
    let host = ann_host(store, &["--version", "v1", "--host-id", "faults-corrupt"])?;
    let feed = homefeed(&host, &ut, &[])?;
    let f = HomefeedClient::connect(&feed.addr, &ClientOptions::default()).await?;
    until_ok(
        || f.candidates("u1", 10, false, None),
        Duration::from_secs(60),
    )
    .await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = traffic(f, stop.clone());
    let newest = tandem_artifact::newest_version(store, MODELS, "tandem")?.0;
    copy_version(store, MODELS, "v2", newest + 1, true)?;
    copy_version(store, MODELS, "v1", newest + 2, false)?;
    copy_version(store, MODELS, "v2", newest + 3, true)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (requests, failed) = load.await?;
    let c = UserTowerClient::connect(&ut.addr, &ClientOptions::default()).await?;
    let loaded: Vec<String> = c
        .versions(None)
        .await?
        .iter()
        .map(|v| v.version.to_string())
        .collect();
    Ok(json!({
        "bad_versions_published": 3,
        "requests": requests,
        "requests_failed": failed,
        "user_tower_versions_after": loaded,
    }))
}

/// `kill -9` an ANN host while it loads a new version; it restarts on a complete version.
async fn kill9_while_loading(store: &Path) -> Result<Value> {
    let mut host = ann_host(store, &["--version", "v1", "--host-id", "faults-load"])?;
    let c = AnnClient::connect(&host.addr, &opts()).await?;
    let load = tokio::spawn(async move { c.load(ModelVersion(2), None).await });
    tokio::time::sleep(Duration::from_millis(5)).await;
    host.kill9();
    let _ = load.await;
    let started = Instant::now();
    let host = ann_host(store, &["--host-id", "faults-load"])?;
    let c = AnnClient::connect(&host.addr, &opts()).await?;
    until_ok(|| c.metadata(None), Duration::from_secs(60)).await?;
    let m = c.metadata(None).await?;
    Ok(json!({
        "resumed_version": m.model_version,
        "restart_to_serving_ms": started.elapsed().as_secs_f64() * 1e3,
    }))
}

/// `kill -9` a training run mid-publish: no partial version becomes visible.
async fn kill9_while_publishing(store: &Path, dir: &Path) -> Result<Value> {
    let data = dir.join("publish-data");
    let exe = std::env::current_exe()?;
    let synth = Command::new(&exe)
        .args([
            "synth",
            "--out",
            s(&data),
            "--users",
            "300",
            "--items",
            "400",
        ])
        .args(["--events", "20000", "--format", "csv"])
        .output()?;
    if !synth.status.success() {
        bail!("synth: {}", String::from_utf8_lossy(&synth.stderr).trim());
    }
    let train = || {
        let mut c = Command::new(&exe);
        c.args([
            "train",
            "--events",
            s(&data.join("events.csv")),
            "--out",
            s(store),
        ])
        .args(["--protocol", "none", "--epochs", "2", "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        c
    };
    // One run to completion gives its duration T; the kills land just before T, inside the
    // write-fsync-rename of the publish.
    let started = Instant::now();
    if !train().status()?.success() {
        bail!("the reference training run failed");
    }
    let full = started.elapsed();
    let before = tandem_artifact::list_versions(store, MODELS, "tandem")?;
    let mut kills = 0;
    for frac in [0.9, 0.95, 0.98, 0.99, 0.995] {
        let mut child = train().spawn()?;
        tokio::time::sleep(full.mul_f64(frac)).await;
        if child.try_wait()?.is_none() {
            kills += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let after = tandem_artifact::list_versions(store, MODELS, "tandem")?;
    let loadable = after
        .iter()
        .filter(|v| {
            tandem_artifact::open::<Value>(&tandem_artifact::version_dir(
                store, MODELS, "tandem", **v,
            ))
            .is_ok()
        })
        .count();
    let completed = after.len() - before.len().min(after.len());
    Ok(json!({
        "run_seconds": full.as_secs_f64(),
        "runs_killed": kills,
        "runs_completed_before_the_kill": completed,
        "versions_after_all_verify": loadable == after.len(),
    }))
}

/// SIGSTOP the user tower for 2 s under orchestrator traffic, then SIGCONT.
async fn stall(store: &Path, dir: &Path) -> Result<Value> {
    let log = dir.join("stall-log");
    let ut = user_tower(store, &log, &[])?;
    let host = ann_host(store, &["--version", "v1", "--host-id", "faults-stall"])?;
    let deadline = Duration::from_millis(500);
    let feed = homefeed(&host, &ut, &["--deadline-ms", "500"])?;
    let f = HomefeedClient::connect(&feed.addr, &ClientOptions::default()).await?;
    until_ok(
        || f.candidates("u1", 10, false, None),
        Duration::from_secs(60),
    )
    .await?;
    let t0 = Instant::now();
    let log_of: Arc<std::sync::Mutex<Vec<(f64, bool)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let (f, log_of, stop) = (f.clone(), log_of.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    n += 16;
                    let at = t0.elapsed().as_secs_f64();
                    let ok = f
                        .candidates(&format!("u{}", n % 97), 10, false, Some(deadline))
                        .await
                        .is_ok();
                    log_of.lock().expect("lock poisoned").push((at, ok));
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    ut.signal("-STOP")?;
    let stopped_at = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    ut.signal("-CONT")?;
    let resumed_at = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await?;
    }
    let log_of = log_of.lock().expect("lock poisoned").clone();
    let failed_in = |from: f64, to: f64| {
        log_of
            .iter()
            .filter(|(at, ok)| *at >= from && *at < to && !ok)
            .count()
    };
    let first_ok = log_of
        .iter()
        .filter(|(at, ok)| *at >= resumed_at && *ok)
        .map(|(at, _)| *at)
        .fold(f64::INFINITY, f64::min);
    let after = resumed_at + deadline.as_secs_f64();
    Ok(json!({
        "requests": log_of.len(),
        // Started before SIGSTOP but still in flight when it came.
        "failed_before_stall": failed_in(0.0, stopped_at),
        "failed_during_stall": failed_in(stopped_at, resumed_at),
        "failed_within_one_deadline_after": failed_in(resumed_at, after),
        "failed_later": failed_in(after, f64::INFINITY),
        "first_success_after_resume_ms": (first_ok - resumed_at) * 1e3,
    }))
}

pub fn run(a: FaultsArgs) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = a.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let store = dir.join("artifacts");
    std::fs::create_dir_all(&store)?;
    if tandem_artifact::list_versions(&store, MODELS, "tandem")?.len() < 2 {
        for seed in [1, 2] {
            tandem_pipeline::publish_small_synthetic(&store, "tandem", seed)?;
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut out = serde_json::Map::new();
    let mut say = |name: &str, r: Result<Value>| {
        let v = r.unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
        if !a.json {
            eprintln!("{name}: {v}");
        }
        out.insert(name.to_string(), v);
    };
    say(
        "kill9_while_recording",
        rt.block_on(kill9_while_recording(&store, &dir)),
    );
    say("disk_full", rt.block_on(disk_full(&store, &dir)));
    say(
        "kill9_while_publishing",
        rt.block_on(kill9_while_publishing(&store, &dir)),
    );
    say(
        "corrupt_versions",
        rt.block_on(corrupt_versions(&store, &dir)),
    );
    say(
        "kill9_while_loading",
        rt.block_on(kill9_while_loading(&store)),
    );
    say("stall", rt.block_on(stall(&store, &dir)));
    if a.json {
        println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
    }
    Ok(())
}
