//! `tandem serve …`: the long-running services. `main` stays a thin shell: bind, install the
//! signal handler, serve until the signal, drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tandem_ann::{AnnConfig, AnnHost};
use tandem_types::ModelVersion;

#[derive(clap::Subcommand, Debug)]
pub enum Serve {
    /// An ANN host: serves one index version, swaps on LoadVersion/Rollback.
    Ann(AnnArgs),
    /// The user-tower service: embeddings for the newest N model versions, engagement intake.
    UserTower(UserTowerArgs),
    /// The homefeed orchestrator: per-request version handshake across the ANN fleet.
    Homefeed(HomefeedArgs),
}

#[derive(clap::Args, Debug)]
pub struct HomefeedArgs {
    #[arg(long, env = "TANDEM_MODEL", default_value = "tandem")]
    pub model: String,
    /// ANN host URLs, comma-separated (http://host:port).
    #[arg(long, env = "TANDEM_ANN_HOSTS", value_delimiter = ',', required = true)]
    pub ann_hosts: Vec<String>,
    /// User-tower URL.
    #[arg(long, env = "TANDEM_USER_TOWER")]
    pub user_tower: String,
    #[arg(long, env = "TANDEM_LISTEN", default_value = "127.0.0.1:7301")]
    pub listen: SocketAddr,
    /// Serve Prometheus metrics on this address (`GET /metrics`); off when unset.
    #[arg(long, env = "TANDEM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Host picking: round-robin, two-choices or sticky.
    #[arg(long, default_value = "two-choices")]
    pub pick: tandem_homefeed::Pick,
    /// sync (the handshake) or naive (measurement only: newest user tower, no handshake).
    #[arg(long, default_value = "sync")]
    pub sync: tandem_homefeed::SyncMode,
    /// How long a host's version metadata is trusted, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub metadata_ttl_ms: u64,
    /// Deadline of one GetCandidates, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub deadline_ms: u64,
}

#[derive(clap::Args, Debug)]
pub struct UserTowerArgs {
    /// Artifact store root.
    #[arg(long, env = "TANDEM_ARTIFACTS", default_value = "artifacts")]
    pub artifacts: PathBuf,
    #[arg(long, env = "TANDEM_MODEL", default_value = "tandem")]
    pub model: String,
    /// Keep the newest N versions loaded (pinned versions are kept too).
    #[arg(long, default_value_t = 3)]
    pub keep: usize,
    #[arg(long, env = "TANDEM_LISTEN", default_value = "127.0.0.1:7201")]
    pub listen: SocketAddr,
    /// Serve Prometheus metrics on this address (`GET /metrics`); off when unset.
    #[arg(long, env = "TANDEM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Directory of the durable engagement log (segment files `tandem train --events` reads).
    #[arg(long, env = "TANDEM_EVENT_LOG", default_value = "events")]
    pub event_log: PathBuf,
    /// Registry poll interval in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub poll_ms: u64,
    /// always: fsync each batch before acknowledging it; never: leave it to the OS.
    #[arg(long, default_value = "always")]
    pub fsync: tandem_usertower::online::Fsync,
    /// Events older than this many days are rejected.
    #[arg(long, default_value_t = 30)]
    pub max_event_age_days: u64,
}

#[derive(clap::Args, Debug)]
pub struct AnnArgs {
    /// Artifact store root (may be shared by several hosts).
    #[arg(long, env = "TANDEM_ARTIFACTS", default_value = "artifacts")]
    pub artifacts: PathBuf,
    /// Model whose index to serve.
    #[arg(long, env = "TANDEM_MODEL", default_value = "tandem")]
    pub model: String,
    /// Version to load at start (default: newest published).
    #[arg(long)]
    pub version: Option<ModelVersion>,
    #[arg(long, env = "TANDEM_LISTEN", default_value = "127.0.0.1:7101")]
    pub listen: SocketAddr,
    /// Serve Prometheus metrics on this address (`GET /metrics`); off when unset.
    #[arg(long, env = "TANDEM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Token required by LoadVersion and Rollback (`authorization: Bearer <token>`); without it
    /// admin RPCs are refused.
    #[arg(long, env = "TANDEM_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// Largest k a search may ask for.
    #[arg(long, default_value_t = 1000)]
    pub max_k: usize,
}

pub fn run(s: Serve) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match s {
            Serve::Ann(a) => {
                let listener = tokio::net::TcpListener::bind(a.listen)
                    .await
                    .with_context(|| format!("binding {}", a.listen))?;
                let metrics = bind_metrics(a.metrics_listen).await?;
                eprintln!(
                    "ann host for {} listening on {}",
                    a.model,
                    listener.local_addr()?
                );
                let host = Arc::new(AnnHost::new(AnnConfig {
                    artifacts: a.artifacts,
                    model: a.model,
                    version: a.version,
                    admin_token: a.admin_token,
                    max_k: a.max_k,
                }));
                start_metrics(metrics, host.metrics().clone())?;
                tandem_ann::serve(host, listener, shutdown_signal()).await?;
                Ok(())
            }
            Serve::UserTower(a) => {
                let mut cfg =
                    tandem_usertower::UserTowerConfig::new(a.artifacts, &a.model, a.event_log);
                cfg.keep = a.keep.max(1);
                cfg.poll = std::time::Duration::from_millis(a.poll_ms.max(10));
                cfg.fsync = a.fsync;
                cfg.max_event_age = std::time::Duration::from_secs(a.max_event_age_days * 86_400);
                let core = Arc::new(
                    tokio::task::spawn_blocking(move || tandem_usertower::UserTower::open(cfg))
                        .await??,
                );
                let listener = tokio::net::TcpListener::bind(a.listen)
                    .await
                    .with_context(|| format!("binding {}", a.listen))?;
                let metrics = bind_metrics(a.metrics_listen).await?;
                eprintln!(
                    "user tower for {} listening on {}",
                    a.model,
                    listener.local_addr()?
                );
                start_metrics(metrics, core.metrics().clone())?;
                tandem_usertower::serve(core, listener, shutdown_signal()).await?;
                Ok(())
            }
            Serve::Homefeed(a) => {
                let mut cfg =
                    tandem_homefeed::HomefeedConfig::new(&a.model, a.ann_hosts, a.user_tower);
                cfg.pick = a.pick;
                cfg.sync = a.sync;
                cfg.metadata_ttl = std::time::Duration::from_millis(a.metadata_ttl_ms);
                cfg.deadline = std::time::Duration::from_millis(a.deadline_ms.max(1));
                let core = Arc::new(tandem_homefeed::Orchestrator::new(cfg)?);
                let listener = tokio::net::TcpListener::bind(a.listen)
                    .await
                    .with_context(|| format!("binding {}", a.listen))?;
                let metrics = bind_metrics(a.metrics_listen).await?;
                eprintln!(
                    "homefeed for {} listening on {}",
                    a.model,
                    listener.local_addr()?
                );
                start_metrics(metrics, core.metrics().clone())?;
                tandem_homefeed::serve(core, listener, shutdown_signal()).await?;
                Ok(())
            }
        }
    })
}

/// Binds the metrics endpoint, when one is asked for. Done with the service's own bind, before
/// anything is printed, so a taken port fails with one line.
pub async fn bind_metrics(addr: Option<SocketAddr>) -> Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr}"))?;
    Ok(Some(listener))
}

/// Serves `registry` on `listener` in the background and prints its address on stderr (after
/// the service's own "listening on" line, which scripts read first).
pub fn start_metrics(
    listener: Option<tokio::net::TcpListener>,
    registry: Arc<tandem_telemetry::Registry>,
) -> Result<()> {
    let Some(listener) = listener else {
        return Ok(());
    };
    eprintln!("metrics on http://{}/metrics", listener.local_addr()?);
    tokio::spawn(tandem_telemetry::serve_metrics(
        registry,
        listener,
        std::future::pending(),
    ));
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutting down: draining in-flight requests");
}
