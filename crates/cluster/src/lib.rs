//! A whole Tandem cluster in one process, on loopback: N ANN hosts, the user tower and the
//! homefeed orchestrator, each started through its library's public `serve` entry point on
//! `127.0.0.1:0` with its own shutdown handle. `tandem demo` and `tandem sim` run on it, and the
//! test harness (`tandem-sandbox`) builds on it. Failures are errors, never panics.
//!
//! The artifact store must already hold what the hosts start on (publish first, e.g. through
//! `tandem-pipeline`); the user tower's event log is `<root>/events`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_ann::{AnnConfig, AnnHost};
use tandem_client::{ClientOptions, EngagementEvent, FleetAdmin, HomefeedClient, UserTowerClient};
use tandem_data::drift::Fresh;
use tandem_homefeed::{HomefeedConfig, Orchestrator};
use tandem_server::ServerOptions;
use tandem_types::{ModelVersion, MODELS};
use tandem_usertower::{UserTower, UserTowerConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("binding a loopback port: {0}")]
    Bind(#[source] std::io::Error),
    #[error(transparent)]
    UserTower(#[from] tandem_usertower::UserTowerError),
    #[error(transparent)]
    Homefeed(#[from] tandem_homefeed::HomefeedError),
    #[error(transparent)]
    Client(#[from] tandem_client::ClientError),
    #[error(transparent)]
    Fleet(#[from] tandem_client::FleetError),
    #[error(transparent)]
    Registry(#[from] tandem_registry::RegistryError),
    #[error("timed out after {seconds}s waiting for {what}")]
    Timeout { what: String, seconds: u64 },
}

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

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

    /// Graceful shutdown: health NOT_SERVING, drain, then return.
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

/// Binds a loopback port and runs `run(listener, shutdown)` on it in the background.
pub async fn spawn<F, Fut>(run: F) -> Result<Service>
where
    F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(ClusterError::Bind)?;
    let addr = listener.local_addr().map_err(ClusterError::Bind)?;
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(run(listener, rx));
    Ok(Service {
        addr,
        stop: Some(tx),
        task: Some(task),
    })
}

/// Polls `pred` every 10 ms until it holds; an error after `timeout`.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut pred: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !pred().await {
        if Instant::now() >= deadline {
            return Err(ClusterError::Timeout {
                what: what.to_string(),
                seconds: timeout.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

type Configure = Box<dyn FnOnce(&mut HomefeedConfig) + Send>;

pub struct ClusterBuilder {
    root: PathBuf,
    model: String,
    hosts: Vec<ModelVersion>,
    keep: usize,
    admin_token: String,
    measurement: bool,
    shards: u32,
    configure: Configure,
}

impl ClusterBuilder {
    /// A cluster over the artifact store `root` whose ANN host `i` starts on `hosts[i]`.
    pub fn new(root: &Path, model: &str, hosts: &[ModelVersion]) -> Self {
        ClusterBuilder {
            root: root.to_path_buf(),
            model: model.to_string(),
            hosts: hosts.to_vec(),
            keep: 3,
            admin_token: "admin".into(),
            measurement: false,
            shards: 1,
            configure: Box::new(|_| {}),
        }
    }

    /// How many versions the user tower keeps.
    pub fn keep(mut self, keep: usize) -> Self {
        self.keep = keep;
        self
    }

    /// The ANN hosts' admin token.
    pub fn admin_token(mut self, token: &str) -> Self {
        self.admin_token = token.to_string();
        self
    }

    /// Lets the hosts answer `allow_version_mismatch` from anyone (the naive mode's
    /// measurement; `tandem sim` compares it with the handshake).
    pub fn measurement_hosts(mut self, on: bool) -> Self {
        self.measurement = on;
        self
    }

    /// Hosts serve shards of sharded versions: host `i` serves shard `i % shards` (so the
    /// first `shards` hosts hold one replica of each). 1 (the default): whole indexes.
    pub fn shards(mut self, shards: u32) -> Self {
        self.shards = shards.max(1);
        self
    }

    /// Adjusts the orchestrator's configuration (host picking, sync mode, hooks).
    pub fn homefeed(mut self, f: impl FnOnce(&mut HomefeedConfig) + Send + 'static) -> Self {
        self.configure = Box::new(f);
        self
    }

    pub async fn start(self) -> Result<Cluster> {
        let published = tandem_registry::Registry::open(&self.root)
            .list(MODELS, &self.model)?
            .len();
        let (user_tower, user_tower_core) = self.start_user_tower(published).await?;
        let mut hosts = Vec::with_capacity(self.hosts.len());
        for (i, &v) in self.hosts.iter().enumerate() {
            hosts.push(self.start_host(i, v).await?);
        }
        let mut cfg = HomefeedConfig::new(
            &self.model,
            hosts.iter().map(Service::url).collect(),
            vec![user_tower.url()],
        );
        (self.configure)(&mut cfg);
        let orchestrator = Arc::new(Orchestrator::new(cfg)?);
        let o = orchestrator.clone();
        let homefeed = spawn(|l, rx| async move {
            if let Err(e) =
                tandem_homefeed::serve(o, l, stopped(rx), ServerOptions::default()).await
            {
                tracing::error!(error = %e, "homefeed server failed");
            }
        })
        .await?;
        Ok(Cluster {
            root: self.root,
            model: self.model,
            admin_token: self.admin_token,
            hosts,
            user_tower,
            user_tower_core,
            homefeed,
            orchestrator,
        })
    }

    /// Starts the user tower and waits until it serves `min(keep, published)` versions.
    async fn start_user_tower(&self, published: usize) -> Result<(Service, Arc<UserTower>)> {
        let mut cfg =
            UserTowerConfig::new(self.root.clone(), &self.model, self.root.join("events"));
        cfg.keep = self.keep;
        cfg.poll = Duration::from_millis(50);
        let core = Arc::new(
            tokio::task::spawn_blocking(move || UserTower::open(cfg))
                .await
                .map_err(|e| tandem_usertower::UserTowerError::Internal(e.to_string()))??,
        );
        let c = core.clone();
        let service = spawn(|l, rx| async move {
            if let Err(e) =
                tandem_usertower::serve(c, l, stopped(rx), ServerOptions::default()).await
            {
                tracing::error!(error = %e, "user-tower server failed");
            }
        })
        .await?;
        let want = self.keep.min(published);
        let probe = core.clone();
        wait_for(Duration::from_secs(60), "the user tower's versions", || {
            let n = probe.loaded().len();
            async move { n >= want }
        })
        .await?;
        Ok((service, core))
    }

    /// Starts one ANN host on `version` and waits until it serves it.
    async fn start_host(&self, index: usize, version: ModelVersion) -> Result<Service> {
        let host =
            Arc::new(AnnHost::new(AnnConfig {
                version: Some(version),
                admin_token: Some(tandem_server::AdminToken::new(&self.admin_token).map_err(
                    |e| tandem_usertower::UserTowerError::InvalidArgument(e.to_string()),
                )?),
                allow_version_mismatch: self.measurement,
                host_id: format!("local-{index}"),
                shard: (self.shards > 1).then_some(index as u32 % self.shards),
                ..AnnConfig::new(self.root.clone(), &self.model)
            }));
        let probe = host.clone();
        let service = spawn(|l, rx| async move {
            if let Err(e) = tandem_ann::serve(host, l, stopped(rx), ServerOptions::default()).await
            {
                tracing::error!(error = %e, "ANN host server failed");
            }
        })
        .await?;
        wait_for(Duration::from_secs(60), "an ANN host's first load", || {
            let ok = probe.serving().is_some();
            async move { ok }
        })
        .await?;
        Ok(service)
    }
}

/// Resolves when the stop handle fires or is dropped.
async fn stopped(rx: oneshot::Receiver<()>) {
    let _ = rx.await;
}

pub struct Cluster {
    pub root: PathBuf,
    pub model: String,
    pub admin_token: String,
    pub hosts: Vec<Service>,
    pub user_tower: Service,
    pub user_tower_core: Arc<UserTower>,
    pub homefeed: Service,
    pub orchestrator: Arc<Orchestrator>,
}

impl Cluster {
    /// ANN host URLs in start order.
    pub fn host_urls(&self) -> Vec<String> {
        self.hosts.iter().map(Service::url).collect()
    }

    /// The user tower's event log.
    pub fn events_dir(&self) -> PathBuf {
        self.root.join("events")
    }

    /// Client options carrying the cluster's admin token.
    pub fn admin_options(&self) -> ClientOptions {
        ClientOptions::default().with_admin_token(self.admin_token.clone())
    }

    /// A homefeed client (connects on first use).
    pub fn homefeed_client(&self) -> Result<HomefeedClient> {
        Ok(HomefeedClient::lazy(
            &self.homefeed.url(),
            &ClientOptions::default(),
        )?)
    }

    /// Fleet operations over every host (admin token included).
    pub fn fleet(&self) -> Result<FleetAdmin> {
        Ok(FleetAdmin::new(
            &self.host_urls(),
            &self.user_tower.url(),
            self.root.clone(),
            &self.model,
            &self.admin_options(),
        )?)
    }
}

/// Records `events` through the user tower's batch RPC at `url`, `batch` at a time; returns
/// (accepted, rejected).
pub async fn record(url: &str, events: &[Fresh], batch: usize) -> Result<(u64, u64)> {
    let client = UserTowerClient::connect(url, &ClientOptions::default()).await?;
    let (mut ok, mut bad) = (0, 0);
    for chunk in events.chunks(batch.max(1)) {
        let batch = chunk
            .iter()
            .map(|e| EngagementEvent {
                user_id: e.user.clone(),
                item_id: e.item.clone(),
                timestamp: e.ts,
                action: "view".into(),
                weight: 1.0,
            })
            .collect();
        let r = client
            .record_batch(batch, Some(Duration::from_secs(30)))
            .await?;
        ok += r.accepted;
        bad += r.rejected;
    }
    Ok((ok, bad))
}
