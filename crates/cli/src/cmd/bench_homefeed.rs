//! `tandem bench homefeed`: GetCandidates latency and CPU per request at fixed offered loads,
//! with the user tower, the ANN hosts and the orchestrator each in its own `tandem serve` process
//! on loopback. CPU time comes from `/proc/<pid>/stat` of every child (all threads, user +
//! system) and of the load generator itself, sampled around each rate's run.

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
    /// Offered loads (requests per second, open loop), run one after another on the same
    /// cluster, e.g. `--rate 1000,2000,4000`.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    pub rate: Vec<u64>,
    /// Seconds of load per rate.
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
    /// Runtime threads of each service process (`tandem serve … --worker-threads`; 0: one per
    /// core). The default, 1, suits this bench's shape: every process shares the same cores.
    #[arg(long, default_value_t = 1)]
    pub service_workers: usize,
    /// The user tower's micro-batching (`tandem serve user-tower --embed-batch-max`; 1: off).
    /// When on, each rate's row reports the mean batch size.
    #[arg(long, default_value_t = 1)]
    pub embed_batch_max: usize,
    /// `tandem serve user-tower --embed-batch-wait-us`.
    #[arg(long, default_value_t = 0)]
    pub embed_batch_wait_us: u64,
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

/// `tandem serve SERVICE` on a free loopback port with `workers` runtime threads, plus `args`.
fn spawn(service: &str, args: &[String], workers: usize) -> Result<(Proc, String)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "serve",
            service,
            "--model",
            MODEL,
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--worker-threads", &workers.to_string()])
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
    let workers = a.service_workers;
    let mut ut_args = s(&[
        "--artifacts",
        &root,
        "--event-log",
        &format!("{root}/events"),
        "--poll-ms",
        "100",
    ]);
    // With batching on, the user tower's metrics tell the mean batch size.
    let ut_metrics = if a.embed_batch_max > 1 {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        ut_args.extend(s(&[
            "--embed-batch-max",
            &a.embed_batch_max.to_string(),
            "--embed-batch-wait-us",
            &a.embed_batch_wait_us.to_string(),
            "--metrics-listen",
            &addr.to_string(),
        ]));
        Some(addr)
    } else {
        None
    };
    let (ut_proc, ut) = spawn("user-tower", &ut_args, workers)?;
    let mut hosts = Vec::new();
    for i in 0..a.hosts.max(1) {
        let mut args = s(&["--artifacts", &root]);
        if shards > 1 {
            args.extend(s(&["--shard", &(i as u32 % shards).to_string()]));
        }
        hosts.push(spawn("ann", &args, workers)?);
    }
    let urls: Vec<String> = hosts.iter().map(|h| h.1.clone()).collect();
    let (hf_proc, hf) = spawn(
        "homefeed",
        &s(&["--ann-hosts", &urls.join(","), "--user-tower", &ut]),
        workers,
    )?;
    let mut procs: Vec<(String, u32)> = vec![("user_tower".into(), ut_proc.0.id())];
    procs.extend(
        hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (format!("ann_{i}"), h.0 .0.id())),
    );
    procs.push(("orchestrator".into(), hf_proc.0.id()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = HomefeedClient::lazy_channel(&hf, &ClientOptions::default())?;
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
        let mut rows = Vec::new();
        for &rate in &a.rate {
            let before = embed_counts(ut_metrics).await?;
            let mut row = load(&client, rate, a.seconds, a.k, &procs).await?;
            if let (Some((e0, b0)), Some((e1, b1))) = (before, embed_counts(ut_metrics).await?) {
                row["embed_mean_batch"] = serde_json::json!((e1 - e0) / (b1 - b0).max(1.0));
            }
            rows.push(row);
            // Let the services go quiet before the next rate.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "bench": "homefeed",
                "processes": { "user_tower": 1, "ann_hosts": a.hosts, "orchestrator": 1 },
                "shards": shards,
                "service_worker_threads": a.service_workers,
                "embed_batching": { "max": a.embed_batch_max, "wait_us": a.embed_batch_wait_us },
                "k": a.k,
                "seconds_per_rate": a.seconds,
                "rates": rows,
            }))?
        );
        anyhow::Ok(())
    })
}

/// One offered rate for `seconds`: latency percentiles, errors (shed ones apart) and CPU µs per
/// request of every service process and of the load generator.
async fn load(
    client: &HomefeedClient,
    rate: u64,
    seconds: u64,
    k: i32,
    procs: &[(String, u32)],
) -> Result<serde_json::Value> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let lat = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let shed = Arc::new(AtomicU64::new(0));
    let total = rate * seconds;
    let before: Vec<f64> = procs
        .iter()
        .map(|(_, pid)| cpu_seconds(&pid.to_string()))
        .collect::<Result<_>>()?;
    let own_before = cpu_seconds("self")?;
    let host_before = host_ticks();
    // Open loop: a request every 1/rate seconds whether or not earlier ones have finished.
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        tick.tick().await;
        let (c, lat, errors, shed) = (client.clone(), lat.clone(), errors.clone(), shed.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            match c.candidates(&format!("u{}", i % 200), k, false, None).await {
                Ok(_) => lat
                    .lock()
                    .expect("lock")
                    .push(t.elapsed().as_secs_f64() * 1e3),
                Err(e) => {
                    errors.fetch_add(1, Ordering::SeqCst);
                    if e.code() == Some(tandem_client::Code::ResourceExhausted) {
                        shed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let wall = started.elapsed().as_secs_f64();
    let per_request = |seconds: f64| seconds * 1e6 / total.max(1) as f64;
    let mut per_process = serde_json::Map::new();
    let mut service = 0.0;
    for ((name, pid), b) in procs.iter().zip(&before) {
        let used = cpu_seconds(&pid.to_string())? - b;
        service += used;
        per_process.insert(name.clone(), serde_json::json!(per_request(used)));
    }
    let own = cpu_seconds("self")? - own_before;
    // Time the hypervisor gave this VM's CPUs to others: runs with a high share are noise.
    let steal = host_before
        .zip(host_ticks())
        .map(|((s0, t0), (s1, t1))| 100.0 * (s1 - s0) as f64 / (t1 - t0).max(1) as f64);
    let mut lat = std::mem::take(&mut *lat.lock().expect("lock"));
    let [p50, p99, p999] = percentiles(&mut lat, [0.5, 0.99, 0.999]);
    Ok(serde_json::json!({
        "rate": rate,
        "requests": total,
        "answered": lat.len(),
        "achieved_rps": lat.len() as f64 / wall,
        "errors": errors.load(Ordering::SeqCst),
        "shed": shed.load(Ordering::SeqCst),
        "p50_ms": p50,
        "p99_ms": p99,
        "p999_ms": p999,
        "max_ms": lat.last().copied().unwrap_or(0.0),
        "service_cpu_us_per_request": per_request(service),
        "per_process_cpu_us_per_request": per_process,
        "load_generator_cpu_us_per_request": per_request(own),
        "host_steal_pct": steal,
    }))
}

/// Steal and total ticks of all CPUs from `/proc/stat` (`None` where it cannot be read).
fn host_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, counted in user].
    Some((*f.get(7)?, f.iter().take(8).sum()))
}

/// The user tower's embeddings and micro-batches so far, from its Prometheus endpoint (`None`
/// without one).
async fn embed_counts(metrics: Option<std::net::SocketAddr>) -> Result<Option<(f64, f64)>> {
    let Some(addr) = metrics else {
        return Ok(None);
    };
    let text = tandem_dashboard::sample::scrape(&addr.to_string())
        .await
        .map_err(anyhow::Error::msg)?;
    // Every series of a counter, summed.
    let total = |name: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with([' ', '{']))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Ok(Some((
        total("tandem_usertower_embeddings_total"),
        total("tandem_usertower_embed_batches_total"),
    )))
}

/// CPU seconds (user + system, every thread) process `pid` (or `self`) has used, from
/// `/proc/<pid>/stat`. The kernel reports clock ticks of USER_HZ, which Linux fixes at 100 on
/// the architectures we build for.
fn cpu_seconds(pid: &str) -> Result<f64> {
    const USER_HZ: f64 = 100.0;
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    // The command name is in parentheses and may hold spaces: count fields after it.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .with_context(|| format!("{path}: no command field"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let tick = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v as f64)
            .with_context(|| format!("{path}: field {} unreadable", i + 3))
    };
    Ok((tick(11)? + tick(12)?) / USER_HZ)
}
