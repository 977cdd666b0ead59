//! The user-tower service over real sockets, with real trained model versions.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_data::synth::{generate, SynthConfig};
use tandem_model::config::{ModelConfig, TrainConfig, UserEncoder};
use tandem_model::publish::publish_model;
use tandem_model::train::{train, TrainInput};
use tandem_model::{UserModel, UserRequest};
use tandem_proto::usertower::v1 as pb;
use tandem_proto::usertower::v1::user_tower_client::UserTowerClient;
use tandem_registry::{LocalFs, Storage, MODELS};
use tandem_types::{ModelManifest, ModelVersion};
use tandem_usertower::{serve, EmbedBatching, UserTower, UserTowerConfig};
use tonic::transport::Channel;
use tonic::Code;

const L: usize = 5;

/// Trains a tiny model with `seed` and publishes it as the next version.
fn publish_version(root: &Path, seed: u64) -> PathBuf {
    publish_with(root, seed, UserEncoder::Mean)
}

fn publish_with(root: &Path, seed: u64, encoder: UserEncoder) -> PathBuf {
    let data = generate(&SynthConfig {
        users: 100,
        items: 120,
        events: 3_000,
        topics: 6,
        seed: 3,
        ..Default::default()
    });
    let input = TrainInput {
        log: &data.events,
        user_features: None,
        item_features: None,
        validation: None,
    };
    let mcfg = ModelConfig {
        dim: 8,
        id_dim: 8,
        feature_dim: 4,
        hidden: 16,
        history: L,
        user_encoder: encoder,
        ..Default::default()
    };
    let tcfg = TrainConfig {
        epochs: 1,
        batch_size: 128,
        seed,
        ..Default::default()
    };
    let (model, _) = train(&input, &mcfg, &tcfg, false).unwrap();
    let meta = ModelManifest {
        dim: 8,
        feature_schema_hash: "h".into(),
        hyperparameters: serde_json::json!({}),
        ..Default::default()
    };
    publish_model(root, "m", None, &model, &meta).unwrap().dir
}

struct Running {
    client: UserTowerClient<Channel>,
    core: Arc<UserTower>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.done.take().unwrap().await.unwrap();
    }
}

async fn start(root: &Path, log: &Path) -> Running {
    start_with(root, log, |_| {}).await
}

async fn start_with(root: &Path, log: &Path, adjust: impl FnOnce(&mut UserTowerConfig)) -> Running {
    let mut cfg = UserTowerConfig::new(root.to_path_buf(), "m", log.to_path_buf());
    cfg.poll = Duration::from_millis(50);
    cfg.history_cap = 50;
    adjust(&mut cfg);
    let core = Arc::new(UserTower::open(cfg).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = core.clone();
    let done = tokio::spawn(async move {
        serve(
            served,
            listener,
            async move {
                let _ = rx.await;
            },
            Default::default(),
        )
        .await
        .unwrap();
    });
    let client = UserTowerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Running {
        client,
        core,
        stop: Some(tx),
        done: Some(done),
    }
}

async fn loaded(c: &mut UserTowerClient<Channel>) -> Vec<String> {
    c.list_versions(pb::ListVersionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .versions
        .into_iter()
        .map(|v| v.model_version)
        .collect()
}

/// Waits (bounded, polling a predicate) until the loaded set equals `want`.
async fn wait_loaded(c: &mut UserTowerClient<Channel>, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if loaded(c).await == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "loaded {:?}, want {want:?}",
            loaded(c).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn embed(version: &str, user: &str, items: &[&str]) -> pb::EmbedRequest {
    pb::EmbedRequest {
        model_name: "m".into(),
        model_version: version.into(),
        user_id: user.into(),
        recent_items: items.iter().map(|s| s.to_string()).collect(),
        features: Default::default(),
        request_time_unix: Some(1_704_200_000),
        min_sequence: None,
    }
}

fn offline(dir: &Path, user: &str, items: &[&str], ts: i64) -> Vec<f32> {
    let m = UserModel::load(dir).unwrap();
    let r = UserRequest {
        user,
        history: items.iter().map(|i| m.item_id(i)).collect(),
        ts,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_loaded_version_matches_its_offline_model_and_publishing_rotates_versions() {
    let dir = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (1..=3).map(|s| publish_version(dir.path(), s)).collect();
    let mut s = start(dir.path(), &dir.path().join("log")).await;
    wait_loaded(&mut s.client, &["v1", "v2", "v3"]).await;
    for (k, d) in dirs.iter().enumerate() {
        let v = format!("v{}", k + 1);
        let got = s
            .client
            .embed(embed(&v, "u1", &["i3", "i7"]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.model_version, v);
        let want = offline(d, "u1", &["i3", "i7"], 1_704_200_000);
        assert!(max_diff(&got.embedding, &want) <= 1e-6, "{v}");
    }
    let err = s.client.embed(embed("v9", "u1", &[])).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("loaded: v1, v2, v3"),
        "{}",
        err.message()
    );

    // Pinned versions survive retention; unpinned ones are evicted on the next poll.
    let pins = LocalFs::new(dir.path());
    pins.pin(MODELS, "m", ModelVersion(1), "ann-0").unwrap();
    publish_version(dir.path(), 4);
    wait_loaded(&mut s.client, &["v1", "v2", "v3", "v4"]).await;
    pins.unpin(MODELS, "m", ModelVersion(1), "ann-0").unwrap();
    wait_loaded(&mut s.client, &["v2", "v3", "v4"]).await;
    assert_eq!(
        s.client
            .embed(embed("v1", "u1", &[]))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micro_batched_embeds_equal_the_offline_model_per_version() {
    let dir = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (1..=2).map(|s| publish_version(dir.path(), s)).collect();
    let mut s = start_with(dir.path(), &dir.path().join("log"), |cfg| {
        cfg.embed_batching = EmbedBatching {
            max: 8,
            wait: Duration::from_millis(5),
        };
    })
    .await;
    wait_loaded(&mut s.client, &["v1", "v2"]).await;
    let items = ["i1", "i2", "i3", "i5", "i8", "i13"];
    let calls = 48;
    let mut asks = tokio::task::JoinSet::new();
    for n in 0..calls {
        let mut c = s.client.clone();
        let v = format!("v{}", 1 + n % 2);
        let user = format!("u{}", n % 7);
        let hist: Vec<&str> = items
            .iter()
            .copied()
            .cycle()
            .skip(n % 5)
            .take(1 + n % 4)
            .collect();
        asks.spawn(async move {
            let got = c.embed(embed(&v, &user, &hist)).await.unwrap().into_inner();
            (n, v, user, hist, got)
        });
    }
    for (n, v, user, hist, got) in asks.join_all().await {
        // Each answer is its own request's row of its own version's model.
        assert_eq!(got.model_version, v);
        let want = offline(&dirs[n % 2], &user, &hist, 1_704_200_000);
        assert!(max_diff(&got.embedding, &want) <= 1e-6, "call {n}");
    }
    let metric = |m| s.core.metrics().value(m, &[]).unwrap_or(0.0);
    let batches = metric(&tandem_telemetry::catalogue::UT_EMBED_BATCHES);
    assert!(batches >= 1.0, "the batcher ran");
    assert!(
        batches < calls as f64,
        "{batches} batches for {calls} concurrent calls"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_engagement_changes_the_next_embedding_and_survives_restarts_and_torn_writes() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = publish_version(dir.path(), 1);
    let log = dir.path().join("log");
    let mut s = start(dir.path(), &log).await;
    wait_loaded(&mut s.client, &["v1"]).await;
    let before = s
        .client
        .embed(embed("v1", "u5", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.history_length, 0);
    let now = tandem_types::clock::now_unix();
    for item in ["i1", "i2"] {
        let ev = pb::EngagementEvent {
            user_id: "u5".into(),
            item_id: item.into(),
            timestamp: now,
            action: "click".into(),
            weight: 1.0,
        };
        s.client.record_engagement(ev).await.unwrap();
    }
    let after = s
        .client
        .embed(embed("v1", "u5", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.history_length, 2);
    assert!(
        max_diff(&before.embedding, &after.embedding) > 1e-3,
        "the new history must change the embedding"
    );
    let want = offline(&model_dir, "u5", &["i2", "i1"], 1_704_200_000);
    assert!(max_diff(&after.embedding, &want) <= 1e-6);
    s.stop().await;

    // Restart: the state is rebuilt from the log.
    let mut s = start(dir.path(), &log).await;
    wait_loaded(&mut s.client, &["v1"]).await;
    let again = s
        .client
        .embed(embed("v1", "u5", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.embedding, after.embedding);
    s.stop().await;

    // A crash mid-append: cut the last record of the last non-empty segment.
    let segs = tandem_data::events::segment_files(&log).unwrap();
    let seg = segs
        .iter()
        .rev()
        .find(|p| {
            std::fs::metadata(p).unwrap().len()
                > tandem_usertower::online::SEGMENT_HEADER.len() as u64
        })
        .unwrap();
    let bytes = std::fs::read(seg).unwrap();
    std::fs::write(seg, &bytes[..bytes.len() - 3]).unwrap();
    let mut s = start(dir.path(), &log).await;
    wait_loaded(&mut s.client, &["v1"]).await;
    let torn = s
        .client
        .embed(embed("v1", "u5", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(torn.history_length, 1, "only the torn record is lost");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_cases_have_defined_behaviour() {
    let dir = tempfile::tempdir().unwrap();
    publish_version(dir.path(), 1);
    let mut s = start(dir.path(), &dir.path().join("log")).await;
    wait_loaded(&mut s.client, &["v1"]).await;
    // Unknown user: a cold-start embedding from an empty history (and request features).
    let cold = s
        .client
        .embed(embed("v1", "never-seen", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((cold.history_length, cold.embedding.len()), (0, 8));
    let mut with_features = embed("v1", "never-seen", &[]);
    with_features.features.insert("segment".into(), "s1".into());
    assert!(s.client.embed(with_features).await.is_ok());
    // Empty user id.
    assert_eq!(
        s.client
            .embed(embed("v1", "", &[]))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // Items unknown to the version are out-of-vocabulary, not errors.
    let oov = s
        .client
        .embed(embed("v1", "u1", &["no-such-item", "i4"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(oov.history_length, 1);
    // Histories longer than L are cut to the L most recent.
    let long: Vec<String> = (0..20).map(|i| format!("i{i}")).collect();
    let long_refs: Vec<&str> = long.iter().map(String::as_str).collect();
    let cut = s
        .client
        .embed(embed("v1", "u1", &long_refs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cut.history_length as usize, L);
    let first_l = s
        .client
        .embed(embed("v1", "u1", &long_refs[..L]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cut.embedding, first_l.embedding);
    // Future and far-past events are refused (documented: 5 minutes of skew, 30 days of age).
    let now = tandem_types::clock::now_unix();
    let ev = |ts: i64| pb::EngagementEvent {
        user_id: "u1".into(),
        item_id: "i1".into(),
        timestamp: ts,
        action: String::new(),
        weight: 0.0,
    };
    let err = s
        .client
        .record_engagement(ev(now + 3_600))
        .await
        .unwrap_err();
    assert!(
        err.code() == Code::InvalidArgument && err.message().contains("in the future"),
        "{err}"
    );
    let err = s
        .client
        .record_engagement(ev(now - 90 * 86_400))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("older than the 30-day limit"),
        "{err}"
    );
    let batch = pb::EngagementBatch {
        events: vec![
            ev(now),
            ev(now + 3_600),
            ev(0),
            pb::EngagementEvent {
                user_id: String::new(),
                ..ev(now)
            },
        ],
    };
    let out = s
        .client
        .record_engagement_batch(batch)
        .await
        .unwrap()
        .into_inner();
    assert_eq!((out.accepted, out.rejected, out.errors.len()), (2, 2, 2));
    let stream = tokio_stream::iter((0..600).map(move |k| pb::EngagementEvent {
        user_id: format!("s{}", k % 7),
        item_id: format!("i{}", k % 50),
        timestamp: now,
        action: "view".into(),
        weight: 1.0,
    }));
    let out = s
        .client
        .record_engagement_stream(stream)
        .await
        .unwrap()
        .into_inner();
    assert_eq!((out.accepted, out.rejected), (600, 0));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transformer_encoder_serves_exactly_the_offline_embedding_of_the_recorded_history() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = publish_with(dir.path(), 1, UserEncoder::Transformer);
    let mut s = start(dir.path(), &dir.path().join("log")).await;
    wait_loaded(&mut s.client, &["v1"]).await;
    // More events than the window (L = 5), at uneven gaps: the window, its gaps and the gap to
    // the event before the window all come from the stored history.
    let now = tandem_types::clock::now_unix();
    let events: Vec<(&str, i64)> = vec![
        ("i1", now - 90_000),
        ("i2", now - 80_000),
        ("i3", now - 3_600),
        ("i4", now - 3_500),
        ("i5", now - 60),
        ("i6", now - 50),
        ("i7", now - 1),
    ];
    for (item, ts) in &events {
        let ev = pb::EngagementEvent {
            user_id: "u9".into(),
            item_id: item.to_string(),
            timestamp: *ts,
            action: "click".into(),
            weight: 1.0,
        };
        s.client.record_engagement(ev).await.unwrap();
    }
    let got = s
        .client
        .embed(embed("v1", "u9", &[]))
        .await
        .unwrap()
        .into_inner();
    let m = UserModel::load(&model_dir).unwrap();
    let offline_of = |times: Vec<i64>| -> Vec<f32> {
        let r = UserRequest {
            user: "u9",
            history: events.iter().rev().map(|(i, _)| m.item_id(i)).collect(),
            history_ts: times,
            ts: 1_704_200_000,
            features: None,
        };
        m.embed_requests(&[r])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let want = offline_of(events.iter().rev().map(|(_, t)| *t).collect());
    assert!(max_diff(&got.embedding, &want) <= 1e-6);
    // The gaps are really read: other times give another embedding.
    let evenly = offline_of((0..events.len() as i64).map(|k| now - k).collect());
    assert!(max_diff(&want, &evenly) > 1e-4);
    s.stop().await;
}
