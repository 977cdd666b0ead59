//! `tandem serve …`: the long-running services. `main` stays a thin shell: bind, install the
//! signal handler, serve until the signal, drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tandem_ann::{AnnConfig, AnnHost};
use tandem_server::{Limits, ServerOptions};

use crate::args::AdminArgs;
use tandem_types::ModelVersion;

#[derive(clap::Subcommand, Debug)]
pub enum Serve {
    /// An ANN host: serves one index version, swaps on LoadVersion/Rollback.
    Ann(AnnArgs),
    /// The user-tower service: embeddings for the newest N model versions, engagement intake.
    UserTower(UserTowerArgs),
    /// The homefeed orchestrator: per-request version handshake across the ANN fleet.
    Homefeed(HomefeedArgs),
    /// A live, read-only fleet dashboard in the browser: hosts × versions, skew, answers per
    /// version, the user tower, retrain history, and a "try a user" box.
    Dashboard(DashboardArgs),
}

#[derive(clap::Args, Debug)]
pub struct DashboardArgs {
    /// ANN host URLs, comma-separated (as `tandem status --hosts`).
    #[arg(long, env = "TANDEM_ANN_HOSTS", value_delimiter = ',', required = true)]
    pub hosts: Vec<String>,
    /// User-tower URL.
    #[arg(long, env = "TANDEM_USER_TOWER")]
    pub user_tower: String,
    /// The orchestrator's gRPC URL, for the "try a user" box.
    #[arg(long, env = "TANDEM_HOMEFEED")]
    pub homefeed: Option<String>,
    /// The orchestrator's metrics endpoint (http://HOST:PORT/metrics), for answers per version.
    #[arg(long)]
    pub homefeed_metrics: Option<String>,
    /// Artifact store root (registry pins and the retrain history).
    #[arg(long, env = "TANDEM_ARTIFACTS", default_value = "artifacts")]
    pub artifacts: PathBuf,
    #[arg(long, env = "TANDEM_MODEL", default_value = "tandem")]
    pub model: String,
    /// Where the page is served; keep it on loopback unless something in front guards it.
    #[arg(long, env = "TANDEM_LISTEN", default_value = "127.0.0.1:7401")]
    pub listen: SocketAddr,
    /// Time between two looks at the fleet, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// How far back the charts reach, in minutes.
    #[arg(long, default_value_t = 10)]
    pub window_min: u64,
    #[command(flatten)]
    pub tls: crate::args::ClientTlsArgs,
}

/// Settings every server shares.
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Serve Prometheus metrics on this address (`GET /metrics`); off when unset.
    #[arg(long, env = "TANDEM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// On SIGTERM, report NOT_SERVING and keep serving this long before draining, so load
    /// balancers and readiness probes stop routing here first (milliseconds).
    #[arg(long, env = "TANDEM_SHUTDOWN_GRACE_MS", default_value_t = 2000)]
    pub shutdown_grace_ms: u64,
    /// Serve TLS with this certificate chain (PEM); plain text without it.
    #[arg(long, env = "TANDEM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM).
    #[arg(long, env = "TANDEM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long, env = "TANDEM_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Requests handled at once; more are refused at once with RESOURCE_EXHAUSTED.
    #[arg(long, env = "TANDEM_MAX_IN_FLIGHT", default_value_t = Limits::default().max_in_flight)]
    pub max_in_flight: usize,
    /// HTTP/2 streams one connection may have open at once.
    #[arg(long, default_value_t = Limits::default().max_concurrent_streams)]
    pub max_concurrent_streams: u32,
    /// Close a connection after this many seconds without a byte in either direction.
    #[arg(long, env = "TANDEM_IDLE_TIMEOUT_S", default_value_t = Limits::default().idle_timeout.as_secs())]
    pub idle_timeout_s: u64,
    /// Threads of the async runtime that serves requests (0: one per core). Where several
    /// service processes share a machine's cores, 1 each spends less CPU per request (fewer
    /// wake-ups of a second thread for one request's work).
    #[arg(long, env = "TANDEM_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
}

impl ServerArgs {
    /// Binds the metrics endpoint (done with the service's own bind, before anything is
    /// printed, so a taken port fails with one line) and reads the TLS files.
    async fn options(&self) -> Result<ServerOptions> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(tandem_server::server_tls(
                cert,
                key,
                self.tls_client_ca.as_deref(),
            )?),
            _ => None,
        };
        Ok(ServerOptions {
            grace: std::time::Duration::from_millis(self.shutdown_grace_ms),
            metrics: bind_metrics(self.metrics_listen).await?,
            tls,
            limits: Limits {
                max_in_flight: self.max_in_flight.max(1),
                max_concurrent_streams: self.max_concurrent_streams.max(1),
                idle_timeout: std::time::Duration::from_secs(self.idle_timeout_s.max(1)),
                ..Limits::default()
            },
        })
    }

    /// The client side of a server that calls others (the orchestrator): its own certificate
    /// doubles as its client identity for upstreams that require mutual TLS.
    fn client_options(
        &self,
        tls_ca: Option<&std::path::Path>,
    ) -> Result<tandem_client::ClientOptions> {
        crate::args::ClientTlsArgs {
            tls_ca: tls_ca.map(Into::into),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
        }
        .options(None)
    }
}

/// Prints where a service listens (scripts read this first line) and its metrics address.
fn announce(what: &str, listener: &tokio::net::TcpListener, opts: &ServerOptions) -> Result<()> {
    eprintln!("{what} listening on {}", listener.local_addr()?);
    if let Some(m) = &opts.metrics {
        eprintln!("metrics on http://{}/metrics", m.local_addr()?);
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct HomefeedArgs {
    #[arg(long, env = "TANDEM_MODEL", default_value = "tandem")]
    pub model: String,
    /// ANN host URLs, comma-separated (http://host:port).
    #[arg(long, env = "TANDEM_ANN_HOSTS", value_delimiter = ',', required = true)]
    pub ann_hosts: Vec<String>,
    /// User-tower replica URLs, comma-separated: requests are spread over them and fail over
    /// between them.
    #[arg(
        long,
        env = "TANDEM_USER_TOWER",
        value_delimiter = ',',
        required = true
    )]
    pub user_tower: Vec<String>,
    #[arg(long, env = "TANDEM_LISTEN", default_value = "127.0.0.1:7301")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub server: ServerArgs,
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
    /// CA certificate (PEM) the ANN hosts' and user tower's https:// certificates chain to.
    #[arg(long, env = "TANDEM_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
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
    #[command(flatten)]
    pub server: ServerArgs,
    /// Where engagement goes: a directory for the embedded durable log (segment files `tandem
    /// train --events` reads; one replica), or `nats://HOST:4222` for the NATS JetStream stream
    /// every replica shares.
    #[arg(
        long,
        alias = "event-log",
        env = "TANDEM_EVENT_LOG",
        default_value = "events"
    )]
    pub events: String,
    #[command(flatten)]
    pub nats: crate::args::NatsArgs,
    /// With NATS: on start, rebuild the state from this window of the stream (30d, 12h).
    #[arg(long, default_value = "30d", value_parser = crate::args::parse_duration)]
    pub state_window: std::time::Duration,
    /// With NATS: report NOT_SERVING while this replica's oldest unapplied message is older.
    #[arg(long, default_value_t = 30.0)]
    pub max_lag_s: f64,
    /// Longest an Embed with min_sequence waits for this replica to apply it, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub max_sequence_wait_ms: u64,
    /// Drill: sleep this many milliseconds after applying each stream message, so the replica
    /// falls behind (for testing the lag bound).
    #[arg(long, hide = true, default_value_t = 0)]
    pub fault_apply_delay_ms: u64,
    /// Registry poll interval in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub poll_ms: u64,
    /// always: fsync each batch before acknowledging it; never: leave it to the OS.
    #[arg(long, default_value = "always")]
    pub fsync: tandem_usertower::online::Fsync,
    /// Events older than this many days are rejected.
    #[arg(long, default_value_t = 30)]
    pub max_event_age_days: u64,
    /// Micro-batch concurrent Embed calls into one forward of at most this many users (1: off,
    /// the default; measured slower than one fused forward per request, see the README).
    #[arg(long, default_value_t = 1)]
    pub embed_batch_max: usize,
    /// With --embed-batch-max > 1: how long an open batch waits for more requests, in
    /// microseconds (0: only what is already queued).
    #[arg(long, default_value_t = 0)]
    pub embed_batch_wait_us: u64,
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
    #[command(flatten)]
    pub server: ServerArgs,
    /// The token LoadVersion and Rollback require; without one, admin RPCs are refused.
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Largest k a search may ask for.
    #[arg(long, default_value_t = 1000)]
    pub max_k: usize,
    /// Largest ef a search may ask for.
    #[arg(long, default_value_t = 4096)]
    pub max_ef: usize,
    /// Honour allow_version_mismatch from any caller (the naive mode's measurement only).
    #[arg(long)]
    pub allow_version_mismatch: bool,
    /// This host's name in the registry's pins and its state file (default: hostname-port).
    #[arg(long, env = "TANDEM_HOST_ID")]
    pub host_id: Option<String>,
    /// Where to record what this host serves, so a restart resumes it (default:
    /// <artifacts>/hosts/<model>-<host-id>.json).
    #[arg(long, env = "TANDEM_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// Serve shard I of sharded index versions (`tandem index --shards S`); without it the host
    /// serves unsharded versions only.
    #[arg(long, env = "TANDEM_SHARD")]
    pub shard: Option<u32>,
}

pub fn run(s: Serve) -> Result<()> {
    let workers = match &s {
        Serve::Ann(a) => a.server.worker_threads,
        Serve::UserTower(a) => a.server.worker_threads,
        Serve::Homefeed(a) => a.server.worker_threads,
        Serve::Dashboard(_) => 0,
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        rt.worker_threads(workers);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async move {
        match s {
            Serve::Ann(a) => serve_ann(a).await,
            Serve::UserTower(a) => serve_user_tower(a).await,
            Serve::Homefeed(a) => serve_homefeed(a).await,
            Serve::Dashboard(a) => serve_dashboard(a).await,
        }
    })
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

async fn serve_ann(a: AnnArgs) -> Result<()> {
    let admin_token = a.admin.token()?;
    if !a.artifacts.is_dir() {
        anyhow::bail!(
            "{}: no such artifact store (a host may wait for its first version, but the store must exist)",
            a.artifacts.display()
        );
    }
    let listener = bind(a.listen).await?;
    let opts = a.server.options().await?;
    announce(&format!("ann host for {}", a.model), &listener, &opts)?;
    let host_id = a.host_id.clone().unwrap_or_else(|| {
        let name = std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        format!("{name}-{}", listener.local_addr().map_or(0, |l| l.port()))
    });
    let host = Arc::new(AnnHost::new(AnnConfig {
        version: a.version,
        admin_token,
        max_k: a.max_k,
        max_ef: a.max_ef.max(1),
        allow_version_mismatch: a.allow_version_mismatch,
        host_id,
        state_file: a.state_file,
        shard: a.shard,
        ..AnnConfig::new(a.artifacts, &a.model)
    }));
    tandem_ann::serve(host, listener, shutdown_signal(), opts).await?;
    Ok(())
}

async fn serve_user_tower(a: UserTowerArgs) -> Result<()> {
    let nats = tandem_stream::is_nats_url(&a.events);
    let mut cfg = tandem_usertower::UserTowerConfig::new(
        a.artifacts,
        &a.model,
        PathBuf::from(if nats { "" } else { &a.events }),
    );
    cfg.keep = a.keep.max(1);
    cfg.poll = std::time::Duration::from_millis(a.poll_ms.max(10));
    cfg.fsync = a.fsync;
    cfg.max_event_age = std::time::Duration::from_secs(a.max_event_age_days * 86_400);
    cfg.max_sequence_wait = std::time::Duration::from_millis(a.max_sequence_wait_ms);
    cfg.fault_apply_delay = std::time::Duration::from_millis(a.fault_apply_delay_ms);
    cfg.embed_batching = tandem_usertower::EmbedBatching {
        max: a.embed_batch_max.max(1),
        wait: std::time::Duration::from_micros(a.embed_batch_wait_us),
    };
    if a.max_lag_s.is_nan() || a.max_lag_s <= 0.0 {
        anyhow::bail!("--max-lag-s must be positive");
    }
    let listener = bind(a.listen).await?;
    let core = if nats {
        let port = listener.local_addr().map_or(0, |l| l.port());
        let options = a
            .nats
            .options(&a.events, &format!("tandem-user-tower-{port}"));
        cfg.nats = Some(tandem_usertower::NatsConfig {
            nats: options.clone(),
            state_window: a.state_window,
            max_lag: std::time::Duration::from_secs_f64(a.max_lag_s),
        });
        let stream = tandem_stream::EventStream::connect(&options).await?;
        Arc::new(tandem_usertower::UserTower::open_replica(cfg, stream))
    } else {
        Arc::new(
            tokio::task::spawn_blocking(move || tandem_usertower::UserTower::open(cfg)).await??,
        )
    };
    let opts = a.server.options().await?;
    let mode = if nats {
        format!("replica on {}", a.events)
    } else {
        format!("local log {}", a.events)
    };
    announce(
        &format!("user tower for {} ({mode})", a.model),
        &listener,
        &opts,
    )?;
    tandem_usertower::serve(core, listener, shutdown_signal(), opts).await?;
    Ok(())
}

async fn serve_homefeed(a: HomefeedArgs) -> Result<()> {
    let mut cfg = tandem_homefeed::HomefeedConfig::new(&a.model, a.ann_hosts, a.user_tower);
    cfg.pick = a.pick;
    cfg.sync = a.sync;
    cfg.metadata_ttl = std::time::Duration::from_millis(a.metadata_ttl_ms);
    cfg.deadline = std::time::Duration::from_millis(a.deadline_ms.max(1));
    cfg.client = a.server.client_options(a.tls_ca.as_deref())?;
    let core = Arc::new(tandem_homefeed::Orchestrator::new(cfg)?);
    let listener = bind(a.listen).await?;
    let opts = a.server.options().await?;
    announce(&format!("homefeed for {}", a.model), &listener, &opts)?;
    tandem_homefeed::serve(core, listener, shutdown_signal(), opts).await?;
    Ok(())
}

async fn serve_dashboard(a: DashboardArgs) -> Result<()> {
    if !a.artifacts.is_dir() {
        anyhow::bail!("{}: no such artifact store", a.artifacts.display());
    }
    let cfg = tandem_dashboard::Config {
        hosts: a.hosts,
        user_tower: a.user_tower,
        homefeed: a.homefeed,
        homefeed_metrics: a.homefeed_metrics,
        artifacts: a.artifacts,
        model: a.model,
        interval: std::time::Duration::from_millis(a.interval_ms.max(50)),
        window: std::time::Duration::from_secs(a.window_min.max(1) * 60),
        client: a.tls.options(None)?,
    };
    let listener = bind(a.listen).await?;
    // Scripts read the address from this first line, as for the other services.
    eprintln!("dashboard listening on {}", listener.local_addr()?);
    tandem_dashboard::serve(cfg, listener, shutdown_signal()).await?;
    Ok(())
}

/// Binds the metrics endpoint, when one is asked for.
pub async fn bind_metrics(addr: Option<SocketAddr>) -> Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr}"))?;
    Ok(Some(listener))
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
    eprintln!("shutting down: not serving, then draining in-flight requests");
}
