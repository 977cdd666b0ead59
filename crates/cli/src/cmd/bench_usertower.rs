//! `tandem bench user-tower`: Embed latency and throughput in-process and over gRPC on loopback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tandem_client::usertower::EngagementEvent;
use tandem_client::{ClientOptions, EmbedQuery, UserTowerClient};
use tandem_data::synth::{generate, SynthConfig};
use tandem_model::config::{ModelConfig, TrainConfig};
use tandem_model::train::TrainInput;
use tandem_pipeline::{train_and_publish, TrainJob};
use tandem_server::ServerOptions;
use tandem_types::clock::now_unix;
use tandem_types::stats::percentiles;
use tandem_types::ModelVersion;
use tandem_usertower::online::Event;
use tandem_usertower::service::EmbedInput;
use tandem_usertower::{UserTower, UserTowerConfig};

#[derive(clap::Args, Debug)]
pub struct UserTowerArgs {
    /// Embed calls per measurement.
    #[arg(long, default_value_t = 4000)]
    pub requests: usize,
    /// RecordEngagement calls per intake measurement.
    #[arg(long, default_value_t = 2000)]
    pub records: usize,
    /// A NATS server with JetStream for the replicated-mode figures; without it the bench
    /// starts `nats-server` from PATH on a free loopback port (and says so when there is none).
    #[arg(long)]
    pub nats: Option<String>,
    /// Output is always JSON; accepted for symmetry with other commands.
    #[arg(long)]
    pub json: bool,
}

/// A `nats-server -js` the bench started, stopped when dropped.
struct OwnNats {
    child: std::process::Child,
    _store: tempfile::TempDir,
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_nats() -> Result<(String, OwnNats)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = tempfile::tempdir()?;
    let child = std::process::Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let own = OwnNats { child, _store: dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((format!("nats://127.0.0.1:{port}"), own))
}

fn one_event(k: usize) -> EngagementEvent {
    EngagementEvent {
        user_id: format!("u{}", k % 2000),
        item_id: format!("i{}", k % 3000),
        timestamp: 0,
        action: "click".into(),
        weight: 1.0,
    }
}

/// RecordEngagement over gRPC: `n` single-event calls from 16 concurrent clients, and `n / 10`
/// batches of 100 from 4; events per second each.
async fn intake(url: &str, n: usize) -> Result<serde_json::Value> {
    let client = UserTowerClient::connect(url, &ClientOptions::default()).await?;
    let mut out = serde_json::Map::new();
    for (name, conc, calls, batch) in [
        ("single_c16", 16usize, n, 1usize),
        ("batch100_c4", 4, n / 10, 100),
    ] {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..conc {
            let client = client.clone();
            let per = calls / conc;
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for k in 0..per {
                    let events: Vec<EngagementEvent> = (0..batch)
                        .map(|b| one_event((w * per + k) * batch + b))
                        .collect();
                    let t = Instant::now();
                    if batch == 1 {
                        client
                            .record(events.into_iter().next().expect("one"), None)
                            .await?;
                    } else {
                        client.record_batch(events, None).await?;
                    }
                    lat.push(t.elapsed().as_secs_f64() * 1e6);
                }
                anyhow::Ok(lat)
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await??);
        }
        let wall = start.elapsed().as_secs_f64();
        let events = lat.len() * batch;
        let mut s = summary(lat, wall);
        s["events_per_s"] = serde_json::json!(events as f64 / wall);
        out.insert(name.into(), s);
    }
    Ok(serde_json::Value::Object(out))
}

/// Serves `core` on a loopback port until `rx` fires; returns its URL.
async fn serve_on_loopback(
    core: Arc<UserTower>,
    rx: tokio::sync::watch::Receiver<bool>,
) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(tandem_usertower::serve(
        core,
        listener,
        async move {
            let mut rx = rx;
            let _ = rx.changed().await;
        },
        ServerOptions::default(),
    ));
    Ok(url)
}

/// Replicated mode: two replicas on one stream. Intake through A, and the replication lag: from
/// A's acknowledgement of one event to B having applied it, for `n` events one at a time.
async fn replicated(root: &std::path::Path, nats: &str, n: usize) -> Result<serde_json::Value> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut cores = Vec::new();
    let mut urls = Vec::new();
    for r in 0..2 {
        let mut cfg = UserTowerConfig::new(
            root.to_path_buf(),
            "bench",
            root.join(format!("unused-{r}")),
        );
        let opts = tandem_stream::NatsOptions {
            stream: "bench".into(),
            ..tandem_stream::NatsOptions::new(nats)
        };
        cfg.nats = Some(tandem_usertower::NatsConfig {
            nats: opts.clone(),
            state_window: Duration::from_secs(86_400),
            max_lag: Duration::from_secs(30),
        });
        let core = Arc::new(UserTower::open_replica(
            cfg,
            tandem_stream::EventStream::connect(&opts).await?,
        ));
        core.refresh().await?;
        urls.push(serve_on_loopback(core.clone(), stop_rx.clone()).await?);
        cores.push(core);
    }
    // Both replicas caught up with the (empty or old) stream.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cores.iter().any(|c| c.not_ready().is_some()) {
        anyhow::ensure!(Instant::now() < deadline, "replicas never got ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let intake = intake(&urls[0], n).await?;
    let a = UserTowerClient::connect(&urls[0], &ClientOptions::default()).await?;
    let (mut lag, mut visible) = (Vec::with_capacity(n / 4), Vec::with_capacity(n / 4));
    for k in 0..n / 4 {
        let sent = Instant::now();
        let seq = a.record(one_event(k), None).await?.sequence;
        let acked = Instant::now();
        while cores[1].applied() < seq {
            tokio::task::yield_now().await;
            anyhow::ensure!(
                acked.elapsed() < Duration::from_secs(10),
                "replica B never applied {seq}"
            );
        }
        lag.push(acked.elapsed().as_secs_f64() * 1e6);
        visible.push(sent.elapsed().as_secs_f64() * 1e6);
    }
    let [p50, p99] = percentiles(&mut lag, [0.5, 0.99]);
    let [v50, v99] = percentiles(&mut visible, [0.5, 0.99]);
    let _ = stop_tx.send(true);
    Ok(serde_json::json!({
        "record": intake,
        "replication_lag_us": {"events": lag.len(), "p50": p50, "p99": p99, "note": "from A's acknowledgement to B having applied the event (A applies before it acknowledges)"},
        "write_to_visible_on_b_us": {"events": visible.len(), "p50": v50, "p99": v99, "note": "from sending RecordEngagement to A until B applied it"},
    }))
}

fn summary(mut lat: Vec<f64>, wall: f64) -> serde_json::Value {
    let [p50, p99] = percentiles(&mut lat, [0.5, 0.99]);
    serde_json::json!({ "requests": lat.len(), "p50_us": p50, "p99_us": p99, "throughput_rps": lat.len() as f64 / wall })
}

pub fn run(a: UserTowerArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = generate(&SynthConfig {
        users: 2_000,
        items: 3_000,
        events: 60_000,
        ..Default::default()
    });
    train_and_publish(TrainJob {
        root: dir.path(),
        name: "bench",
        version: None,
        input: TrainInput {
            log: &data.events,
            user_features: None,
            item_features: None,
            validation: None,
        },
        model: &ModelConfig::default(),
        train: &TrainConfig {
            epochs: 1,
            ..Default::default()
        },
        extra: serde_json::json!({}),
        index: None,
        progress: false,
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let core = Arc::new(UserTower::open(UserTowerConfig::new(dir.path().to_path_buf(), "bench", dir.path().join("log")))?);
        core.refresh().await?;
        // Give every user a full 50-item history through the real intake path.
        let now = now_unix();
        let events: Vec<Event> = (0..data.events.len())
            .rev()
            .take(100_000)
            .map(|e| Event { user: data.events.users.name(data.events.user[e]).into(), item: data.events.items.name(data.events.item[e]).into(), ts: now, action: "view".into(), weight: 1.0 })
            .collect();
        core.record(events).await?;
        let users: Arc<Vec<String>> = Arc::new((0..2_000).map(|u| format!("u{u}")).collect());
        let req = |k: usize, users: &Vec<String>| EmbedInput {
            model_name: String::new(),
            model_version: ModelVersion(1),
            user_id: users[k % users.len()].clone(),
            recent_items: Vec::new(),
            features: Default::default(),
            request_time: None,
            min_sequence: None,
        };
        let mut out = serde_json::Map::new();

        for conc in [1usize, 64] {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for w in 0..conc {
                let (core, users) = (core.clone(), users.clone());
                let n = a.requests / conc;
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(n);
                    for k in 0..n {
                        let t = Instant::now();
                        core.embed(req(w * n + k, &users)).await.expect("embed");
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    lat
                }));
            }
            let mut lat = Vec::new();
            for t in tasks {
                lat.extend(t.await?);
            }
            out.insert(format!("in_process_c{conc}"), summary(lat, start.elapsed().as_secs_f64()));
        }

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tandem_usertower::serve(core.clone(), listener, async move {
            let _ = rx.await;
        }, ServerOptions::default()));
        let client = UserTowerClient::connect(&format!("http://{addr}"), &ClientOptions::default()).await?;
        for conc in [1usize, 64] {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for w in 0..conc {
                let client = client.clone();
                let users = users.clone();
                let n = a.requests / conc;
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(n);
                    for k in 0..n {
                        let r = req(w * n + k, &users);
                        let t = Instant::now();
                        client
                            .embed(r.model_version, EmbedQuery::user(r.user_id), None)
                            .await
                            .expect("embed");
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    lat
                }));
            }
            let mut lat = Vec::new();
            for t in tasks {
                lat.extend(t.await?);
            }
            out.insert(format!("grpc_c{conc}"), summary(lat, start.elapsed().as_secs_f64()));
        }
        // Intake: the embedded local log (fsync on every batch, the default) over gRPC.
        out.insert("record_local_fsync".into(), intake(&format!("http://{addr}"), a.records).await?);
        let _ = tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        let mut _own = None;
        let nats = match &a.nats {
            Some(u) => Some(u.clone()),
            None => match start_nats() {
                Ok((u, o)) => {
                    _own = Some(o);
                    Some(u)
                }
                Err(e) => {
                    out.insert("replicated".into(), serde_json::json!({"skipped": format!("no NATS server: {e} (install nats-server or pass --nats)")}));
                    None
                }
            },
        };
        if let Some(url) = nats {
            out.insert("replicated".into(), replicated(dir.path(), &url, a.records).await?);
        }
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "bench": "user-tower", "history": 50, "dim": 64, "results": out }))?);
        anyhow::Ok(())
    })
}
