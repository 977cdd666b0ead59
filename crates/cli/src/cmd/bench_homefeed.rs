//! `tandem bench homefeed`: GetCandidates latency at a fixed offered load, with the user tower,
//! the ANN hosts and the orchestrator each in its own `tandem serve` process on loopback.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tandem_client::{ClientOptions, HomefeedClient};
use tandem_types::stats::percentiles;

const MODEL: &str = "tandem";

#[derive(clap::Args, Debug)]
pub struct HomefeedArgs {
    /// Offered load (requests per second, open loop).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// ANN host processes (with `--shards S`, host `i` serves shard `i % S`).
    #[arg(long, default_value_t = 2)]
    pub hosts: usize,
    /// Split the index into this many shards (1: every host holds the whole index). The
    /// orchestrator then fans each request out to one replica per shard and merges.
    #[arg(long, default_value_t = 1)]
    pub shards: u32,
    #[arg(long, default_value_t = 50)]
    pub k: i32,
    /// Output is always JSON; accepted for symmetry with other commands.
    #[arg(long)]
    pub json: bool,
}

/// A child service process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[String]) -> Result<(Proc, String)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning a service")?;
    let mut line = String::new();
    BufReader::new(child.stderr.as_mut().context("stderr")?).read_line(&mut line)?;
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    Ok((Proc(child), format!("http://{addr}")))
}

pub fn run(a: HomefeedArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_str().context("temp path")?.to_string();
    let shards = a.shards.max(1);
    anyhow::ensure!(
        a.hosts.max(1) >= shards as usize,
        "--hosts {} cannot hold {shards} shards: give every shard a host",
        a.hosts
    );
    tandem_pipeline::publish_small_synthetic_sharded(dir.path(), MODEL, 1, shards)?;
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (_ut, ut) = spawn(&s(&[
        "serve",
        "user-tower",
        "--artifacts",
        &root,
        "--model",
        MODEL,
        "--listen",
        "127.0.0.1:0",
        "--event-log",
        &format!("{root}/events"),
        "--poll-ms",
        "100",
    ]))?;
    let mut hosts = Vec::new();
    for i in 0..a.hosts.max(1) {
        let mut args = s(&[
            "serve",
            "ann",
            "--artifacts",
            &root,
            "--model",
            MODEL,
            "--listen",
            "127.0.0.1:0",
        ]);
        if shards > 1 {
            args.extend(s(&["--shard", &(i as u32 % shards).to_string()]));
        }
        hosts.push(spawn(&args)?);
    }
    let urls: Vec<String> = hosts.iter().map(|h| h.1.clone()).collect();
    let (_hf, hf) = spawn(&s(&[
        "serve",
        "homefeed",
        "--model",
        MODEL,
        "--ann-hosts",
        &urls.join(","),
        "--user-tower",
        &ut,
        "--listen",
        "127.0.0.1:0",
    ]))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = HomefeedClient::lazy(&hf, &ClientOptions::default())?;
        // Wait (bounded) until the cluster answers.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = client.candidates("u1", a.k, false, None).await;
            if r.is_ok() {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "cluster never answered: {:?}",
                r.err()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Open loop: a request every 1/rate seconds whether or not earlier ones have finished.
        let lat = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let total = a.rate * a.seconds;
        let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / a.rate.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(total as usize);
        for i in 0..total {
            tick.tick().await;
            let (c, lat, errors, k) = (client.clone(), lat.clone(), errors.clone(), a.k);
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                match c.candidates(&format!("u{}", i % 200), k, false, None).await {
                    Ok(_) => lat
                        .lock()
                        .expect("lock")
                        .push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        let wall = started.elapsed().as_secs_f64();
        let mut lat = std::mem::take(&mut *lat.lock().expect("lock"));
        let [p50, p99] = percentiles(&mut lat, [0.5, 0.99]);
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "bench": "homefeed",
                "processes": { "user_tower": 1, "ann_hosts": a.hosts, "orchestrator": 1 },
                "shards": shards,
                "offered_rps": a.rate,
                "requests": total,
                "errors": errors.load(std::sync::atomic::Ordering::SeqCst),
                "achieved_rps": lat.len() as f64 / wall,
                "p50_ms": p50,
                "p99_ms": p99,
                "max_ms": lat.last().copied().unwrap_or(0.0),
                "k": a.k,
            }))?
        );
        anyhow::Ok(())
    })
}
