//! The in-process cluster harness behind the integration tests and `tandem sim rollout`.
//!
//! [`SandboxBuilder`] trains two small model versions (different seeds), publishes their models
//! and indexes into a temporary artifact store, and starts N ANN hosts, a user tower and a
//! homefeed orchestrator in-process on `127.0.0.1:0`, each with its own shutdown handle. Tests
//! wait on predicates ([`wait_until`]), never on fixed sleeps.

pub mod scenario;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_ann::{AnnConfig, AnnHost};
use tandem_data::synth::{generate, SynthConfig};
use tandem_homefeed::{HomefeedConfig, Orchestrator};
use tandem_index::HnswParams;
use tandem_model::config::{ModelConfig, TrainConfig};
use tandem_model::publish::publish_model;
use tandem_model::train::{train, TrainInput};
use tandem_model::TwoTower;
use tandem_proto::ann::v1 as ann;
use tandem_proto::ann::v1::ann_search_client::AnnSearchClient;
use tandem_proto::homefeed::v1::homefeed_client::HomefeedClient;
use tandem_retrain::candidate::{build_index, profile_queries};
use tandem_types::{ModelManifest, ModelVersion};
use tandem_usertower::{UserTower, UserTowerConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub const MODEL: &str = "tandem";
pub const TOKEN: &str = "admin";

/// One running in-process server.
pub struct Service {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Service {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful shutdown: drain, then return.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// A crash: the server task is aborted, its connections drop mid-flight.
    pub fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.stop.take();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn spawn<F, Fut>(run: F) -> Service
where
    F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(run(listener, rx));
    Service {
        addr,
        stop: Some(tx),
        task: Some(task),
    }
}

/// Polls `pred` until it holds (bounded by `timeout`).
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut pred: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !pred().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Trains version `seed` of a small model and publishes its model and index.
pub fn publish_version(root: &Path, seed: u64) {
    let data = generate(&SynthConfig {
        users: 200,
        items: 300,
        events: 8_000,
        topics: 6,
        seed: 11,
        ..Default::default()
    });
    let input = TrainInput {
        log: &data.events,
        user_features: None,
        item_features: None,
        validation: None,
    };
    let mcfg = ModelConfig {
        dim: 16,
        id_dim: 16,
        feature_dim: 4,
        hidden: 32,
        history: 10,
        ..Default::default()
    };
    let tcfg = TrainConfig {
        epochs: 3,
        batch_size: 256,
        lr: 5e-3,
        seed,
        ..Default::default()
    };
    let (model, _) = train(&input, &mcfg, &tcfg, false).expect("train");
    let meta = ModelManifest {
        dim: 16,
        data: data.events.data_range(),
        hyperparameters: serde_json::json!({}),
        ..Default::default()
    };
    let published = publish_model(root, MODEL, None, &model, &meta).expect("publish model");
    // Index what was published (the reloaded model), as `tandem index` does.
    let loaded = TwoTower::load(&published.dir).expect("reload");
    let queries = profile_queries(&loaded, 200).expect("recall queries");
    let built = build_index(&loaded, &HnswParams::default(), queries).expect("index");
    built
        .publish(root, MODEL, published.version, &meta.feature_schema_hash)
        .expect("publish index");
}

type Bootstrap = Box<dyn FnOnce(&Path) + Send>;

pub struct SandboxBuilder {
    hosts: Vec<u64>,
    keep: usize,
    configure: Box<dyn FnOnce(&mut HomefeedConfig) + Send>,
    bootstrap: Bootstrap,
    root: Option<std::path::PathBuf>,
}

impl SandboxBuilder {
    /// `hosts[i]` is the version ANN host `i` starts on.
    pub fn new(hosts: &[u64]) -> Self {
        SandboxBuilder {
            hosts: hosts.to_vec(),
            keep: 3,
            configure: Box::new(|_| {}),
            bootstrap: Box::new(|root| {
                publish_version(root, 1);
                publish_version(root, 2);
            }),
            root: None,
        }
    }

    /// Keeps the artifact store (and event log) in `dir` instead of a temporary directory.
    pub fn root(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.root = Some(dir.into());
        self
    }

    /// Replaces the default bootstrap (v1 and v2 of a tiny model): `f` gets the artifact root
    /// and must publish (model and index of model [`MODEL`]) every version a host starts on. It
    /// may also seed the user tower's event log in `<root>/events`.
    pub fn bootstrap(mut self, f: impl FnOnce(&Path) + Send + 'static) -> Self {
        self.bootstrap = Box::new(f);
        self
    }

    /// How many versions the user tower keeps.
    pub fn keep(mut self, keep: usize) -> Self {
        self.keep = keep;
        self
    }

    /// Adjusts the orchestrator's configuration (host picking, sync mode, hooks).
    pub fn homefeed(mut self, f: impl FnOnce(&mut HomefeedConfig) + Send + 'static) -> Self {
        self.configure = Box::new(f);
        self
    }

    pub async fn start(self) -> Sandbox {
        let dir = match self.root {
            Some(path) => {
                std::fs::create_dir_all(&path).expect("sandbox root");
                Root { path, _tmp: None }
            }
            None => {
                let tmp = tempfile::tempdir().expect("tempdir");
                Root {
                    path: tmp.path().to_path_buf(),
                    _tmp: Some(tmp),
                }
            }
        };
        let root = dir.path().to_path_buf();
        let boot = self.bootstrap;
        tokio::task::spawn_blocking(move || boot(&root))
            .await
            .expect("bootstrap");
        let published = tandem_artifact_count(dir.path());

        let mut ut_cfg =
            UserTowerConfig::new(dir.path().to_path_buf(), MODEL, dir.path().join("events"));
        ut_cfg.keep = self.keep;
        ut_cfg.poll = Duration::from_millis(50);
        let core = Arc::new(UserTower::open(ut_cfg).expect("user tower"));
        let user_tower = spawn(|l, rx| {
            let core = core.clone();
            async move {
                let _ = tandem_usertower::serve(core, l, async move {
                    let _ = rx.await;
                })
                .await;
            }
        })
        .await;
        let want = self.keep.min(published);
        let probe = core.clone();
        wait_until(Duration::from_secs(30), "user tower versions", || {
            let n = probe.loaded().len();
            async move { n >= want }
        })
        .await;

        let mut hosts = Vec::new();
        for &v in &self.hosts {
            let host = Arc::new(AnnHost::new(AnnConfig {
                artifacts: dir.path().to_path_buf(),
                model: MODEL.into(),
                version: Some(ModelVersion(v)),
                admin_token: Some(TOKEN.into()),
                max_k: 1000,
            }));
            let probe = host.clone();
            hosts.push(
                spawn(|l, rx| async move {
                    let _ = tandem_ann::serve(host, l, async move {
                        let _ = rx.await;
                    })
                    .await;
                })
                .await,
            );
            wait_until(Duration::from_secs(30), "ANN host load", || {
                let ok = probe.serving().is_some();
                async move { ok }
            })
            .await;
        }

        let mut cfg = HomefeedConfig::new(
            MODEL,
            hosts.iter().map(Service::url).collect(),
            user_tower.url(),
        );
        (self.configure)(&mut cfg);
        let orchestrator = Arc::new(Orchestrator::new(cfg).expect("orchestrator"));
        let homefeed = spawn(|l, rx| {
            let o = orchestrator.clone();
            async move {
                let _ = tandem_homefeed::serve(o, l, async move {
                    let _ = rx.await;
                })
                .await;
            }
        })
        .await;
        let client = HomefeedClient::connect(homefeed.url())
            .await
            .expect("connect homefeed");
        Sandbox {
            dir,
            hosts,
            user_tower,
            homefeed,
            orchestrator,
            client,
        }
    }
}

/// The sandbox's artifact root: a temporary directory unless one was given.
pub struct Root {
    path: std::path::PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Root {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub struct Sandbox {
    /// The artifact root; the user tower's event log is `<dir>/events`.
    pub dir: Root,
    pub hosts: Vec<Service>,
    pub user_tower: Service,
    pub homefeed: Service,
    pub orchestrator: Arc<Orchestrator>,
    pub client: HomefeedClient<Channel>,
}

impl Sandbox {
    /// ANN host URLs in start order.
    pub fn host_urls(&self) -> Vec<String> {
        self.hosts.iter().map(Service::url).collect()
    }

    pub fn events_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("events")
    }

    /// The offline models of every published version, for exact ground truth.
    pub fn models(&self) -> BTreeMap<String, TwoTower> {
        (1..=2u64)
            .map(|v| {
                let dir = tandem_artifact_dir(self.dir.path(), ModelVersion(v));
                (
                    ModelVersion(v).to_string(),
                    TwoTower::load(&dir).expect("load model"),
                )
            })
            .collect()
    }
}

fn tandem_artifact_count(root: &Path) -> usize {
    tandem_registry::Registry::open(root)
        .list(tandem_registry::MODELS, MODEL)
        .map(|v| v.len())
        .unwrap_or(0)
}

fn tandem_artifact_dir(root: &Path, v: ModelVersion) -> std::path::PathBuf {
    root.join("models").join(MODEL).join(v.to_string())
}

/// An admin client for one ANN host.
pub async fn admin(url: &str) -> AnnSearchClient<Channel> {
    AnnSearchClient::connect(url.to_string())
        .await
        .expect("connect host")
}

fn with_token<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("header"),
    );
    r
}

/// Moves ANN host `url` to `version` (as a rollout step does).
pub async fn load(url: &str, version: &str) {
    admin(url)
        .await
        .load_version(with_token(ann::LoadVersionRequest {
            version: version.into(),
        }))
        .await
        .expect("load version");
}

/// Rolls ANN host `url` back to its previous version.
pub async fn rollback(url: &str) {
    admin(url)
        .await
        .rollback(with_token(ann::RollbackRequest {}))
        .await
        .expect("rollback");
}
