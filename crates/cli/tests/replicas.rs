//! User-tower replicas on NATS JetStream (#16), against real processes: Debian's `nats-server`
//! (`.ci/run` installs it) on a loopback port with a temporary store, and `tandem serve
//! user-tower --events nats://…` replicas.

mod common;

use std::collections::HashSet;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tandem_client::{ClientOptions, EmbedQuery, EngagementEvent, HomefeedClient, UserTowerClient};
use tandem_model::{UserModel, UserRequest};
use tandem_types::ModelVersion;

/// A `nats-server` with JetStream on a free loopback port, stopped when dropped.
struct Nats {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
}

impl Nats {
    fn start(store: &Path) -> Nats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut n = Nats {
            child: None,
            port,
            store: store.to_path_buf(),
        };
        n.restart();
        n
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is not installed: `apt-get install -y nats-server` (.ci/run does this)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A small trained store with v1 and its index.
fn store(dir: &Path) -> PathBuf {
    let data = synth(dir, "csv");
    let artifacts = dir.join("a");
    train_small(&data.join("events.csv"), &artifacts);
    let model = artifacts.join("models/tandem/v1");
    ok(&["index", "--model", p(&model), "--out", p(&artifacts)]);
    artifacts
}

fn replica(artifacts: &Path, nats: &str, extra: &[&str]) -> (Server, String, Option<String>) {
    let mut args = vec!["--shutdown-grace-ms", "0"];
    args.extend_from_slice(extra);
    serve_user_tower(artifacts, nats, &args)
}

const T0: i64 = 1_704_200_000;

fn query(user: &str, min_sequence: Option<u64>) -> EmbedQuery {
    EmbedQuery {
        user_id: user.into(),
        request_time_unix: Some(T0),
        min_sequence,
        ..Default::default()
    }
}

/// Waits until the replica at `url` answers Embed (it refuses while rebuilding).
async fn ready(url: &str) -> UserTowerClient {
    let c = UserTowerClient::lazy(url, &ClientOptions::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c.embed(ModelVersion(1), query("probe", None), None).await {
            Ok(_) => return c,
            Err(e) => assert!(Instant::now() < deadline, "{url} never got ready: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn event(user: &str, item: &str) -> EngagementEvent {
    EngagementEvent {
        user_id: user.into(),
        item_id: item.into(),
        timestamp: 0,
        action: "click".into(),
        weight: 1.0,
    }
}

fn offline(model_dir: &Path, user: &str, history: &[String]) -> Vec<f32> {
    let m = UserModel::load(model_dir).unwrap();
    let r = UserRequest {
        user,
        history: history.iter().map(|i| m.item_id(i)).collect(),
        ts: T0,
        features: None,
        ..Default::default()
    };
    m.embed_requests(&[r])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_write_on_one_replica_is_read_on_another_with_min_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let artifacts = store(dir.path());
    let nats = Nats::start(&dir.path().join("js"));
    let (_a, a_url, _) = replica(&artifacts, &nats.url(), &[]);
    let (_b, b_url, _) = replica(&artifacts, &nats.url(), &[]);
    rt().block_on(async {
        let (a, b) = (ready(&a_url).await, ready(&b_url).await);
        let items = ["i3", "i17", "i42", "i8"];
        let mut seq = 0;
        for i in items {
            let r = a.record(event("u7", i), None).await.unwrap();
            assert_eq!(r.accepted, 1);
            assert!(
                r.sequence > seq,
                "sequences increase: {} then {}",
                seq,
                r.sequence
            );
            seq = r.sequence;
        }
        let got = b
            .embed(ModelVersion(1), query("u7", Some(seq)), None)
            .await
            .unwrap();
        let history: Vec<String> = items.iter().rev().map(|s| s.to_string()).collect();
        assert_eq!(
            got.history, history,
            "B serves A's writes, most recent first"
        );
        let want = offline(&artifacts.join("models/tandem/v1"), "u7", &history);
        assert!(
            max_diff(&got.vector, &want) < 1e-5,
            "B's embedding is the offline model's"
        );

        // A sequence nobody has written yet: the replica says it is behind (UNAVAILABLE, so an
        // orchestrator tries another), within the bounded wait.
        let t = Instant::now();
        let e = b
            .embed(ModelVersion(1), query("u7", Some(seq + 1000)), None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    });
    // The CLI prints the sequence and takes it back.
    let rec: serde_json::Value = serde_json::from_str(&ok(&[
        "call",
        "user-tower",
        "record",
        "--addr",
        &a_url,
        "--user",
        "u9",
        "--item",
        "i5",
        "--json",
    ]))
    .unwrap();
    let seq = rec["sequence"].as_u64().unwrap();
    let emb: serde_json::Value = serde_json::from_str(&ok(&[
        "call",
        "user-tower",
        "embed",
        "--addr",
        &b_url,
        "--model-version",
        "v1",
        "--user",
        "u9",
        "--min-sequence",
        &seq.to_string(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(emb["history"], serde_json::json!(["i5"]));
}

#[test]
fn killing_a_replica_under_load_fails_no_request_and_a_restarted_one_rebuilds_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let artifacts = store(dir.path());
    let nats = Nats::start(&dir.path().join("js"));
    let (a, a_url, _) = replica(&artifacts, &nats.url(), &[]);
    let (_b, b_url, _) = replica(&artifacts, &nats.url(), &[]);
    let (_host, host_url) = serve_ann(&artifacts, &[]);
    let (_hf, hf_url) = spawn_server(&[
        "serve",
        "homefeed",
        "--listen",
        "127.0.0.1:0",
        "--ann-hosts",
        &host_url,
        "--user-tower",
        &format!("{a_url},{b_url}"),
        "--shutdown-grace-ms",
        "0",
    ]);
    let mut a = Some(a);
    rt().block_on(async {
        let (ua, ub) = (ready(&a_url).await, ready(&b_url).await);
        // Engagement for 50 users, then traffic.
        for u in 0..50 {
            let events: Vec<EngagementEvent> = (0..5)
                .map(|k| event(&format!("u{u}"), &format!("i{}", (u * 7 + k) % 300)))
                .collect();
            ua.record_batch(events, None).await.unwrap();
        }
        let hf = HomefeedClient::lazy(&hf_url, &ClientOptions::default()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while hf.candidates("u1", 10, false, None).await.is_err() {
            assert!(Instant::now() < deadline, "the homefeed never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        // 16 clients, each paced at 62.5 requests a second: 1,000 requests a second offered.
        for w in 0..16 {
            let (hf, sent, failed, errors, stop) = (
                hf.clone(),
                sent.clone(),
                failed.clone(),
                errors.clone(),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_micros(16_000));
                let mut k = w;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    k += 16;
                    sent.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = hf
                        .candidates(&format!("u{}", k % 50), 10, false, None)
                        .await
                    {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.lock().unwrap().push(e.to_string());
                    }
                }
            }));
        }
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(a.take()); // SIGKILL replica A under load
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let rate = sent.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        println!(
            "{} requests at {rate:.0}/s, {} failed",
            sent.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed)
        );
        assert_eq!(
            failed.load(Ordering::Relaxed),
            0,
            "{:?}",
            errors.lock().unwrap().first()
        );
        assert!(sent.load(Ordering::Relaxed) > 1000);

        // A restarted replica rebuilds exactly B's state from the stream.
        let (_a2, a2_url, _) = replica(&artifacts, &nats.url(), &[]);
        let ua2 = ready(&a2_url).await;
        for u in 0..50 {
            let user = format!("u{u}");
            let x = ua2
                .embed(ModelVersion(1), query(&user, None), None)
                .await
                .unwrap();
            let y = ub
                .embed(ModelVersion(1), query(&user, None), None)
                .await
                .unwrap();
            assert_eq!(x.history, y.history, "{user}");
            assert_eq!(x.history.len(), 5, "{user}");
            assert!(max_diff(&x.vector, &y.vector) < 1e-6, "{user}");
        }
    });
}

#[test]
fn stopping_nats_under_write_load_refuses_writes_keeps_embeds_and_loses_or_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let artifacts = store(dir.path());
    let mut nats = Nats::start(&dir.path().join("js"));
    let (_a, a_url, _) = replica(&artifacts, &nats.url(), &[]);
    let (_b, b_url, _) = replica(&artifacts, &nats.url(), &[]);
    rt().block_on(async {
        let (ua, ub) = (ready(&a_url).await, ready(&b_url).await);
        let acked = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
        let refused = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Each write is a fresh item for one of 20 users: a duplicate would show in a history.
        let writer = {
            let (ua, acked, refused, stop) =
                (ua.clone(), acked.clone(), refused.clone(), stop.clone());
            tokio::spawn(async move {
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let (user, item) = (format!("w{}", k % 20), format!("i{}", k / 20));
                    match ua
                        .record(event(&user, &item), Some(Duration::from_secs(3)))
                        .await
                    {
                        Ok(r) if r.accepted == 1 => acked.lock().unwrap().push((user, item)),
                        Ok(r) => panic!("rejected: {:?}", r.errors),
                        Err(e) => {
                            assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{e}");
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    k += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        nats.stop();
        let before = acked.lock().unwrap().len();
        // While the server is away: writes are refused, never acknowledged; reads go on. A
        // publish in flight when the server went away waits out the 2 s JetStream ack timeout
        // before it is refused, so allow for that (and a loaded machine) before judging.
        let deadline = Instant::now() + Duration::from_secs(10);
        while refused.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            refused.load(Ordering::Relaxed) > 0,
            "no write was refused within 10 s"
        );
        assert!(
            acked.lock().unwrap().len() <= before + 1,
            "a write was acknowledged with NATS down"
        );
        ua.embed(ModelVersion(1), query("w1", None), None)
            .await
            .unwrap();
        ub.embed(ModelVersion(1), query("w1", None), None)
            .await
            .unwrap();
        nats.restart();
        // Writes resume once the clients reconnected.
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked.lock().unwrap().len() < before + 50 {
            assert!(
                Instant::now() < deadline,
                "writes never resumed after the restart"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.store(true, Ordering::Relaxed);
        writer.await.unwrap();
        let acked = acked.lock().unwrap().clone();
        let last = ua
            .record(event("w0", "final"), None)
            .await
            .unwrap()
            .sequence;
        for (name, c) in [("A", &ua), ("B", &ub)] {
            for u in 0..20 {
                let user = format!("w{u}");
                let got = c
                    .embed(ModelVersion(1), query(&user, Some(last)), None)
                    .await
                    .unwrap()
                    .history;
                let unique: HashSet<&String> = got.iter().collect();
                assert_eq!(
                    unique.len(),
                    got.len(),
                    "{name} applied an event twice for {user}: {got:?}"
                );
                for (_, item) in acked.iter().filter(|(w, _)| *w == user) {
                    assert!(got.contains(item), "{name} lost acknowledged {user}/{item}");
                }
            }
        }
    });
}

#[test]
fn a_replica_that_falls_behind_reports_its_lag_and_stops_serving() {
    let dir = tempfile::tempdir().unwrap();
    let artifacts = store(dir.path());
    let nats = Nats::start(&dir.path().join("js"));
    let (_a, a_url, _) = replica(&artifacts, &nats.url(), &[]);
    // B applies one message every 300 ms: a replica that cannot keep up.
    let (_b, b_url, b_metrics) = replica(
        &artifacts,
        &nats.url(),
        &[
            "--fault-apply-delay-ms",
            "300",
            "--max-lag-s",
            "1",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    rt().block_on(async {
        let (ua, ub) = (ready(&a_url).await, ready(&b_url).await);
        for k in 0..40 {
            ua.record(event("slow", &format!("i{k}")), None)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let metrics = b_metrics.unwrap();
        let metrics = if metrics.starts_with("http") {
            metrics
        } else {
            format!("http://{metrics}")
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let lag = loop {
            let lag = sample(
                &http_get(&metrics),
                "tandem_usertower_replication_lag_seconds",
            )
            .unwrap();
            if lag > 1.0 {
                break lag;
            }
            assert!(
                Instant::now() < deadline,
                "the lag never passed the bound (last {lag})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // Health and Embed both say so, with the reason.
        let channel = tonic::transport::Endpoint::from_shared(b_url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            if s == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
                break;
            }
            assert!(Instant::now() < deadline, "B still SERVING at lag {lag}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let e = ub
            .embed(ModelVersion(1), query("slow", None), None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(tonic::Code::Unavailable));
        assert!(e.to_string().contains("replication lag"), "{e}");
        // The healthy replica is unaffected, and B recovers once it caught up.
        ua.embed(ModelVersion(1), query("slow", None), None)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while ub
            .embed(ModelVersion(1), query("slow", None), None)
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "B never caught up");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}
