//! The test harness: an in-process cluster ([`tandem_cluster`]) with two small model versions
//! trained with different seeds in a temporary artifact store, and short helpers that panic with
//! a clear message instead of returning errors — so a test reads as its scenario. Production
//! commands never depend on this crate.

pub mod scenario;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tandem_client::{AnnClient, ClientOptions, HomefeedClient};
use tandem_cluster::ClusterBuilder;
pub use tandem_cluster::Service;
use tandem_homefeed::{HomefeedConfig, Orchestrator};
use tandem_model::TwoTower;
use tandem_types::{ModelVersion, MODELS};

pub const MODEL: &str = "tandem";
pub const TOKEN: &str = "admin";

/// Polls `pred` until it holds; panics naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, pred: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if let Err(e) = tandem_cluster::wait_for(timeout, what, pred).await {
        panic!("{e}");
    }
}

/// Publishes the next version of a small synthetic model trained with `seed` (model and index).
pub fn publish_version(root: &Path, seed: u64) {
    tandem_pipeline::publish_small_synthetic(root, MODEL, seed)
        .expect("train and publish a sandbox version");
}

type Bootstrap = Box<dyn FnOnce(&Path) + Send>;

pub struct SandboxBuilder {
    hosts: Vec<u64>,
    keep: usize,
    configure: Box<dyn FnOnce(&mut HomefeedConfig) + Send>,
    bootstrap: Bootstrap,
    root: Option<PathBuf>,
    shards: u32,
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
            shards: 1,
        }
    }

    /// Hosts serve shards of sharded versions: host `i` serves shard `i % shards` (the
    /// bootstrap must publish versions split that way).
    pub fn shards(mut self, shards: u32) -> Self {
        self.shards = shards;
        self
    }

    /// Keeps the artifact store (and event log) in `dir` instead of a temporary directory.
    pub fn root(mut self, dir: impl Into<PathBuf>) -> Self {
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
        let hosts: Vec<ModelVersion> = self.hosts.iter().map(|&v| ModelVersion(v)).collect();
        let c = ClusterBuilder::new(dir.path(), MODEL, &hosts)
            .keep(self.keep)
            .admin_token(TOKEN)
            // The naive-mode scenario measures what skew costs.
            .measurement_hosts(true)
            .homefeed(self.configure)
            .shards(self.shards)
            .start()
            .await
            .expect("start the sandbox cluster");
        let client = c.homefeed_client().expect("homefeed client");
        Sandbox {
            dir,
            hosts: c.hosts,
            user_tower: c.user_tower,
            homefeed: c.homefeed,
            orchestrator: c.orchestrator,
            client,
        }
    }
}

/// The sandbox's artifact root: a temporary directory unless one was given.
pub struct Root {
    path: PathBuf,
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
    pub client: HomefeedClient,
}

impl Sandbox {
    /// ANN host URLs in start order.
    pub fn host_urls(&self) -> Vec<String> {
        self.hosts.iter().map(Service::url).collect()
    }

    pub fn events_dir(&self) -> PathBuf {
        self.dir.path().join("events")
    }

    /// The offline models of v1 and v2, for exact ground truth.
    pub fn models(&self) -> BTreeMap<ModelVersion, TwoTower> {
        (1..=2u64)
            .map(|v| {
                let dir =
                    tandem_artifact::version_dir(self.dir.path(), MODELS, MODEL, ModelVersion(v));
                (ModelVersion(v), TwoTower::load(&dir).expect("load model"))
            })
            .collect()
    }

    /// Fleet operations over every host, with the admin token.
    pub fn fleet(&self) -> tandem_client::FleetAdmin {
        tandem_client::FleetAdmin::new(
            &self.host_urls(),
            &self.user_tower.url(),
            self.dir.path().to_path_buf(),
            MODEL,
            &admin_options(),
        )
        .expect("fleet")
    }
}

/// Client options with the sandbox's admin token.
pub fn admin_options() -> ClientOptions {
    ClientOptions::default().with_admin_token(TOKEN)
}

/// An admin client for one ANN host.
pub fn admin(url: &str) -> AnnClient {
    AnnClient::lazy(url, &admin_options()).expect("ANN client")
}

/// Moves ANN host `url` to `version` (as a rollout step does).
pub async fn load(url: &str, version: &str) {
    let v: ModelVersion = version.parse().expect("version");
    admin(url).load(v, None).await.expect("load version");
}

/// Rolls ANN host `url` back to its previous version.
pub async fn rollback(url: &str) {
    admin(url).rollback(None).await.expect("rollback");
}
