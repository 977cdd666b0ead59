//! The live fleet dashboard: one self-contained page (no CDN, no external script) and the small
//! JSON API it polls.
//!
//! A sampler task reads the fleet once per interval — every ANN host's version metadata, the
//! user tower's loaded versions and pins, the orchestrator's answers per version from its
//! metrics endpoint — and keeps a ring of samples covering the last minutes, so a page opened
//! late still draws the recent past. The HTTP side ([`http`]) only reads what the sampler
//! wrote, plus the retrain history file and, for the "try a user" box, one `GetCandidates` call.
//! Everything is read-only: the dashboard holds no admin token.
//!
//! Layout: [`sample`] (what one sample holds and how the rollout state is read from it),
//! [`http`] (routes), `page.html` (the page, embedded at build time).

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tandem_client::{ClientError, ClientOptions, FleetAdmin, HomefeedClient, UserTowerClient};
use tokio::net::TcpListener;

pub mod http;
pub mod sample;

pub use sample::{FleetView, RolloutState, Sample};

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Fleet(#[from] tandem_client::FleetError),
}

pub type Result<T, E = DashboardError> = std::result::Result<T, E>;

/// What the dashboard watches.
#[derive(Debug, Clone)]
pub struct Config {
    /// ANN host URLs (as `tandem status --hosts`).
    pub hosts: Vec<String>,
    pub user_tower: String,
    /// The orchestrator, for the "try a user" box; the box says it is off without one.
    pub homefeed: Option<String>,
    /// The orchestrator's Prometheus endpoint (`http://host:port/metrics`), for answers per
    /// version; the chart says it is off without one.
    pub homefeed_metrics: Option<String>,
    /// Artifact store root: pins and the retrain history.
    pub artifacts: PathBuf,
    pub model: String,
    /// Time between samples.
    pub interval: Duration,
    /// How far back the charts reach.
    pub window: Duration,
    pub client: ClientOptions,
}

/// The sampler's output, read by the HTTP handlers.
pub(crate) struct Shared {
    pub(crate) cfg: Config,
    pub(crate) homefeed: Option<HomefeedClient>,
    pub(crate) live: RwLock<Live>,
}

#[derive(Default)]
pub(crate) struct Live {
    /// The newest full view (hosts, user tower, rollout state); none before the first sample.
    pub(crate) view: Option<FleetView>,
    /// One entry per interval, oldest first, at most `window / interval`.
    pub(crate) series: VecDeque<Sample>,
}

/// Samples the fleet every `cfg.interval` and serves the page and its API on `listener` until
/// `shutdown` resolves.
pub async fn serve(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let fleet = FleetAdmin::new(
        &cfg.hosts,
        &cfg.user_tower,
        cfg.artifacts.clone(),
        &cfg.model,
        &cfg.client,
    )?;
    let user_tower = UserTowerClient::lazy(&cfg.user_tower, &cfg.client)?;
    let homefeed = match &cfg.homefeed {
        Some(url) => Some(HomefeedClient::lazy(url, &cfg.client)?),
        None => None,
    };
    let shared = Arc::new(Shared {
        cfg,
        homefeed,
        live: RwLock::new(Live::default()),
    });
    let sampler = tokio::spawn(sample::run(shared.clone(), fleet, user_tower));
    http::run(shared, listener, shutdown).await;
    sampler.abort();
    Ok(())
}
