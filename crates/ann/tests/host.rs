//! The ANN host over real sockets: servers in-process on 127.0.0.1:0, real artifact files.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_server::admin::AdminToken;

use tandem_ann::{serve, AnnConfig, AnnHost};
use tandem_index::artifact::{publish, IndexManifest, INDEX_FILE};
use tandem_index::{build, synthetic_embeddings, HnswParams};
use tandem_proto::ann::v1 as pb;
use tandem_proto::ann::v1::ann_search_client::AnnSearchClient;
use tandem_types::ModelVersion;
use tonic::transport::Channel;
use tonic::{Code, Request};

const DIM: usize = 16;
const TOKEN: &str = "s3cret";

fn publish_version(root: &Path, version: u64) {
    let n = 2_000;
    let vectors = synthetic_embeddings(n, DIM, 8, 100 + version, 200 + version);
    let index = build(vectors, DIM, &HnswParams::default()).unwrap();
    let items: Vec<String> = (0..n).map(|i| format!("i{i}")).collect();
    let v = ModelVersion(version);
    let meta = IndexManifest {
        versions: BTreeMap::from([("m".to_string(), v)]),
        index_id: format!("m-{v}"),
        model_name: "m".into(),
        model_version: v,
        item_count: n as u64,
        dim: DIM,
        params: HnswParams::default(),
        build_seconds: 0.0,
        ann_recall_at_10: 1.0,
        recall_queries: 0,
        recall_query_source: "test".into(),
        feature_schema_hash: String::new(),
        shards: 0,
        shard_items: Vec::new(),
    };
    publish(root, index.as_ref(), &items, &meta).unwrap();
}

struct Running {
    client: AnnSearchClient<Channel>,
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn start(root: &Path, version: Option<u64>) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_on(listener, root, version).await
}

async fn start_on(listener: tokio::net::TcpListener, root: &Path, version: Option<u64>) -> Running {
    let addr = listener.local_addr().unwrap();
    let host = Arc::new(AnnHost::new(AnnConfig {
        version: version.map(ModelVersion),
        admin_token: Some(AdminToken::new(TOKEN).unwrap()),
        max_k: 100,
        // Each host its own name and so its own state file, as `tandem serve ann` names hosts
        // (hostname-port): with one shared name a host started without a version would resume
        // what another one recorded instead of loading the newest.
        host_id: format!("host-{}", addr.port()),
        ..AnnConfig::new(root.to_path_buf(), "m")
    }));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        host,
        listener,
        async move {
            let _ = rx.await;
        },
        Default::default(),
    ));
    let client = AnnSearchClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Running {
        client,
        addr,
        stop: Some(tx),
    }
}

/// Polls `metadata` until it reports `version` (a predicate wait, bounded, no fixed sleep).
async fn wait_for_version(
    client: &mut AnnSearchClient<Channel>,
    version: &str,
) -> pb::VersionMetadata {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(m) = client
            .get_version_metadata(pb::GetVersionMetadataRequest {})
            .await
        {
            if m.get_ref().model_version == version {
                return m.into_inner();
            }
        }
        assert!(Instant::now() < deadline, "host never reported {version}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn admin<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

fn query(version: &str) -> pb::SearchRequest {
    let e = synthetic_embeddings(1, DIM, 8, 101, 999);
    pb::SearchRequest {
        model_name: "m".into(),
        model_version: version.into(),
        embedding: e,
        k: 10,
        ef: None,
        allow_version_mismatch: false,
        exclude_item_ids: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_on_two_versions_report_their_own_metadata() {
    let dir = tempfile::tempdir().unwrap();
    publish_version(dir.path(), 1);
    publish_version(dir.path(), 2);
    let mut a = start(dir.path(), Some(1)).await;
    let mut b = start(dir.path(), None).await;
    let ma = wait_for_version(&mut a.client, "v1").await;
    let mb = wait_for_version(&mut b.client, "v2").await;
    assert_eq!(ma.versions.get("m").map(String::as_str), Some("v1"));
    assert_eq!(mb.versions.get("m").map(String::as_str), Some("v2"));
    assert_eq!(
        (ma.index_id.as_str(), ma.item_count, ma.dim),
        ("m-v1", 2000, DIM as u32)
    );
    assert_ne!(a.addr, b.addr);
    let res = b.client.search(query("v2")).await.unwrap().into_inner();
    assert_eq!((res.items.len(), res.model_version.as_str()), (10, "v2"));
    assert!(res.items.windows(2).all(|w| w[0].score >= w[1].score));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_with_another_version_is_refused_and_bad_arguments_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    publish_version(dir.path(), 1);
    let mut h = start(dir.path(), Some(1)).await;
    wait_for_version(&mut h.client, "v1").await;
    let err = h.client.search(query("v2")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("serves m v1") && err.message().contains("m v2"),
        "{}",
        err.message()
    );

    let cases: Vec<(pb::SearchRequest, &str)> = vec![
        (
            pb::SearchRequest {
                embedding: vec![0.1; DIM + 1],
                ..query("v1")
            },
            "dimension 17",
        ),
        (
            pb::SearchRequest {
                embedding: {
                    let mut e = query("v1").embedding;
                    e[3] = f32::NAN;
                    e
                },
                ..query("v1")
            },
            "embedding[3] is not finite",
        ),
        (
            pb::SearchRequest {
                k: 0,
                ..query("v1")
            },
            "k must be in 1..=100",
        ),
        (
            pb::SearchRequest {
                k: 101,
                ..query("v1")
            },
            "got 101",
        ),
        (
            pb::SearchRequest {
                model_version: String::new(),
                ..query("v1")
            },
            "model_version is required",
        ),
    ];
    for (req, needle) in cases {
        let err = h.client.search(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{needle}");
        assert!(
            err.message().contains(needle),
            "{} vs {needle}",
            err.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_rpcs_need_the_token() {
    let dir = tempfile::tempdir().unwrap();
    publish_version(dir.path(), 1);
    let mut h = start(dir.path(), Some(1)).await;
    wait_for_version(&mut h.client, "v1").await;
    let err = h
        .client
        .load_version(pb::LoadVersionRequest {
            version: "v1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut wrong = Request::new(pb::RollbackRequest {});
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        h.client.rollback(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_swap_under_continuous_search_load_fails_no_request_and_rollback_restores() {
    let dir = tempfile::tempdir().unwrap();
    publish_version(dir.path(), 1);
    publish_version(dir.path(), 2);
    let mut h = start(dir.path(), Some(1)).await;
    wait_for_version(&mut h.client, "v1").await;

    let done = Arc::new(AtomicBool::new(false));
    let (ok, refused, failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut workers = Vec::new();
    for _ in 0..4 {
        let mut c = h.client.clone();
        let (done, ok, refused, failed) =
            (done.clone(), ok.clone(), refused.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let mut version = "v1".to_string();
            // Bounded: stops when the swaps are done, or after 20,000 requests.
            for _ in 0..20_000 {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                match c.search(query(&version)).await {
                    Ok(r) => {
                        assert_eq!(
                            r.get_ref().model_version,
                            version,
                            "answer from another version"
                        );
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    // The host moved on: refresh the version like the orchestrator does.
                    Err(e) if e.code() == Code::FailedPrecondition => {
                        refused.fetch_add(1, Ordering::SeqCst);
                        version = c
                            .get_version_metadata(pb::GetVersionMetadataRequest {})
                            .await
                            .unwrap()
                            .into_inner()
                            .model_version;
                    }
                    Err(e) => {
                        eprintln!("failed: {e}");
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    // Let traffic flow, then swap forth and back several times under load.
    let mut admin_client = h.client.clone();
    let before = ok.load(Ordering::SeqCst);
    while ok.load(Ordering::SeqCst) < before + 200 {
        tokio::task::yield_now().await;
    }
    for round in 0..3 {
        let r = admin_client
            .load_version(admin(pb::LoadVersionRequest {
                version: "v2".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (
                r.metadata.unwrap().model_version.as_str(),
                r.previous_version.as_str()
            ),
            ("v2", "v1"),
            "round {round}"
        );
        let mark = ok.load(Ordering::SeqCst);
        while ok.load(Ordering::SeqCst) < mark + 100 {
            tokio::task::yield_now().await;
        }
        let r = admin_client
            .rollback(admin(pb::RollbackRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (
                r.metadata.unwrap().model_version.as_str(),
                r.previous_version.as_str()
            ),
            ("v1", "v2"),
            "round {round}"
        );
        let mark = ok.load(Ordering::SeqCst);
        while ok.load(Ordering::SeqCst) < mark + 100 {
            tokio::task::yield_now().await;
        }
    }
    done.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let (ok, refused, failed) = (
        ok.load(Ordering::SeqCst),
        refused.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
    );
    eprintln!("hot swap: {ok} answered, {refused} version refusals, {failed} failed");
    assert_eq!(failed, 0);
    // By construction ≥ 800 answers (200 before, 100 after each of six swaps), and every swap
    // is raced: the workers still state the old version, so each swap costs at least one refusal.
    assert!(ok >= 800, "{ok}");
    assert!(refused >= 6, "{refused}");
    // After three rollbacks there is nothing older than v1 to go back to.
    let err = admin_client
        .rollback(admin(pb::RollbackRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_index_is_refused_at_load_and_the_host_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    publish_version(dir.path(), 1);
    publish_version(dir.path(), 2);
    let path = tandem_index::artifact::index_dir(dir.path(), "m", ModelVersion(2)).join(INDEX_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let mut h = start(dir.path(), Some(1)).await;
    wait_for_version(&mut h.client, "v1").await;
    let err = h
        .client
        .load_version(admin(pb::LoadVersionRequest {
            version: "v2".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("checksum mismatch")
            && err.message().contains("index.bin")
            && err.message().contains("still serving v1"),
        "{}",
        err.message()
    );
    assert_eq!(
        h.client
            .get_version_metadata(pb::GetVersionMetadataRequest {})
            .await
            .unwrap()
            .into_inner()
            .model_version,
        "v1"
    );
    assert_eq!(
        h.client
            .search(query("v1"))
            .await
            .unwrap()
            .into_inner()
            .items
            .len(),
        10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_until_an_index_is_loaded() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path(), None).await;
    let channel = Channel::from_shared(format!("http://{}", h.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let service = "tandem.ann.v1.AnnSearch".to_string();
    let status = health
        .check(HealthCheckRequest {
            service: service.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    assert_eq!(
        h.client.search(query("v1")).await.unwrap_err().code(),
        Code::Unavailable
    );
    publish_version(dir.path(), 1);
    h.client
        .load_version(admin(pb::LoadVersionRequest {
            version: "v1".into(),
        }))
        .await
        .unwrap();
    let status = health
        .check(HealthCheckRequest { service })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_measurement_only_mismatch_flag_answers_and_names_the_real_version() {
    let dir = tempfile::tempdir().unwrap();
    publish_version(dir.path(), 1);
    let mut h = start(dir.path(), Some(1)).await;
    wait_for_version(&mut h.client, "v1").await;
    let req = pb::SearchRequest {
        allow_version_mismatch: true,
        ..query("v2")
    };
    // Not for any caller: only a host started for measurement, or an admin.
    let refused = h.client.search(req.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let mut as_admin = tonic::Request::new(req);
    as_admin
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let res = h.client.search(as_admin).await.unwrap().into_inner();
    assert_eq!((res.model_version.as_str(), res.items.len()), ("v1", 10));
}

/// `exclude_item_ids`: the excluded items are skipped inside the graph walk, the answer still
/// holds k items and keeps the rest of the unfiltered answer; unknown ids are ignored (they
/// may live on another shard); more than the limit is INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_items_are_left_out_and_the_answer_still_holds_k() {
    let dir = tempfile::tempdir().unwrap();
    publish_version(dir.path(), 1);
    let mut h = start(dir.path(), Some(1)).await;
    wait_for_version(&mut h.client, "v1").await;
    let ids = |r: &pb::SearchResponse| -> Vec<String> {
        r.items.iter().map(|i| i.item_id.clone()).collect()
    };
    let plain = ids(&h.client.search(query("v1")).await.unwrap().into_inner());
    assert_eq!(plain.len(), 10);
    let mut exclude: Vec<String> = plain[..4].to_vec();
    exclude.push("no-such-item".into());
    let filtered = h
        .client
        .search(pb::SearchRequest {
            exclude_item_ids: exclude.clone(),
            ..query("v1")
        })
        .await
        .unwrap()
        .into_inner();
    let got = ids(&filtered);
    assert_eq!(got.len(), 10, "{got:?}");
    assert!(got.iter().all(|i| !exclude.contains(i)), "{got:?}");
    let kept = plain[4..].iter().filter(|i| got.contains(i)).count();
    assert!(
        kept >= 5,
        "the rest of the unfiltered answer: {got:?} vs {plain:?}"
    );

    let err = h
        .client
        .search(pb::SearchRequest {
            exclude_item_ids: (0..=tandem_ann::MAX_EXCLUDE)
                .map(|i| i.to_string())
                .collect(),
            ..query("v1")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("exclude_item_ids"),
        "{}",
        err.message()
    );
}

/// The typed client's lean transport (plain `http://`, lazily connected): answers, passes a
/// refusal's code and message through, reports a stopped host as unreachable, and reconnects
/// once a host listens on the address again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lean_client_transport_answers_refuses_fails_over_and_reconnects() {
    use tandem_client::{AnnClient, ClientOptions, SearchQuery};
    let dir = tempfile::tempdir().unwrap();
    publish_version(dir.path(), 1);
    let mut h = start(dir.path(), Some(1)).await;
    wait_for_version(&mut h.client, "v1").await;
    let addr = h.addr;
    let opts = ClientOptions {
        connect_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let c = AnnClient::lazy(&format!("http://{addr}"), &opts).unwrap();
    let ask = |v: u64| SearchQuery {
        model_name: "m".into(),
        version: ModelVersion(v),
        embedding: query("v1").embedding,
        k: 10,
        ef: None,
        allow_version_mismatch: false,
        exclude: Vec::new(),
    };
    let t = Some(Duration::from_secs(5));
    // Concurrent calls share the one connection.
    let answers = futures_util::future::join_all((0..8).map(|_| c.search(ask(1), t))).await;
    for a in answers {
        let a = a.unwrap();
        assert_eq!((a.items.len(), a.version), (10, ModelVersion(1)));
    }
    let refused = c.search(ask(2), t).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::FailedPrecondition), "{refused}");
    assert!(refused.to_string().contains("serves m v1"), "{refused}");

    drop(h);
    let deadline = Instant::now() + Duration::from_secs(30);
    let down = loop {
        match c.search(ask(1), t).await {
            Err(e) => break e,
            Ok(_) => assert!(Instant::now() < deadline, "the stopped host still answers"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(down.code(), Some(Code::Unavailable), "{down}");

    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let mut again = start_on(listener, dir.path(), Some(1)).await;
    wait_for_version(&mut again.client, "v1").await;
    let a = c.search(ask(1), t).await.unwrap();
    assert_eq!(a.items.len(), 10);
}
