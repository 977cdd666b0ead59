//! The per-request protocol (see the crate docs).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_proto::ann::v1 as ann;
use tandem_proto::ann::v1::ann_search_client::AnnSearchClient;
use tandem_proto::usertower::v1 as ut;
use tandem_proto::usertower::v1::user_tower_client::UserTowerClient;
use tandem_telemetry::{catalogue as m, Registry};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tracing::{field, Instrument};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    RoundRobin,
    /// Power of two choices on in-flight requests.
    TwoChoices,
    /// Hash of the user id: a user keeps hitting the same host while it is healthy.
    Sticky,
}

impl std::str::FromStr for Pick {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" => Ok(Pick::RoundRobin),
            "two-choices" => Ok(Pick::TwoChoices),
            "sticky" => Ok(Pick::Sticky),
            o => Err(format!(
                "unknown host picking {o:?} (expected round-robin, two-choices or sticky)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// The handshake: the host's version, then that version's embedding, then that host.
    Sync,
    /// Newest user-tower version, no handshake; for measuring the failure only.
    Naive,
}

impl std::str::FromStr for SyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sync" => Ok(SyncMode::Sync),
            "naive" => Ok(SyncMode::Naive),
            o => Err(format!("unknown sync mode {o:?} (expected sync or naive)")),
        }
    }
}

/// A hook run between Embed and Search (tests make a host flip there, deterministically).
pub type BetweenHook = Arc<
    dyn Fn(&str) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync,
>;

#[derive(Clone)]
pub struct HomefeedConfig {
    pub model: String,
    /// ANN host URLs (`http://host:port`).
    pub ann_hosts: Vec<String>,
    pub user_tower: String,
    pub pick: Pick,
    pub sync: SyncMode,
    /// How long a host's version metadata is trusted.
    pub metadata_ttl: Duration,
    /// Deadline for the whole request.
    pub deadline: Duration,
    /// Deadline for one RPC (so one slow host leaves time to try another).
    pub rpc_timeout: Duration,
    pub max_k: i32,
    pub between_embed_and_search: Option<BetweenHook>,
}

impl HomefeedConfig {
    pub fn new(model: &str, ann_hosts: Vec<String>, user_tower: String) -> Self {
        HomefeedConfig {
            model: model.to_string(),
            ann_hosts,
            user_tower,
            pick: Pick::RoundRobin,
            sync: SyncMode::Sync,
            metadata_ttl: Duration::from_millis(500),
            deadline: Duration::from_secs(2),
            rpc_timeout: Duration::from_millis(500),
            max_k: 1000,
            between_embed_and_search: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HomefeedError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("request deadline exceeded")]
    DeadlineExceeded,
    #[error("no ANN host could answer: {reasons}")]
    NoHostAnswered { reasons: String },
    #[error("user tower: {0}")]
    UserTower(String),
}

/// An answer: items plus where they came from.
#[derive(Debug, Clone)]
pub struct Candidates {
    pub items: Vec<(String, f32)>,
    pub model_name: String,
    /// The version of the index that answered.
    pub index_version: String,
    /// The version the user embedding came from.
    pub embedding_version: String,
    pub host: String,
    pub attempts: u32,
}

struct Host {
    url: String,
    client: AnnSearchClient<Channel>,
    cached: Mutex<Option<(String, Instant)>>,
    in_flight: AtomicU32,
}

pub struct Orchestrator {
    cfg: HomefeedConfig,
    hosts: Vec<Host>,
    user_tower: UserTowerClient<Channel>,
    next: AtomicUsize,
    newest: Mutex<Option<(String, Instant)>>,
    metrics: Arc<Registry>,
}

/// Runs one outgoing RPC in a client span named `name`, with the span's trace context injected
/// into the request's metadata (so the callee's server span becomes its child).
async fn traced<T, R, F>(
    name: &'static str,
    peer: &str,
    mut req: tonic::Request<T>,
    call: impl FnOnce(tonic::Request<T>) -> F,
) -> Result<R, tonic::Status>
where
    F: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    let span = tracing::info_span!(
        "rpc.client",
        otel.name = name,
        otel.kind = "client",
        rpc.system = "grpc",
        tandem.peer = %peer,
        otel.status_code = field::Empty,
    );
    tandem_telemetry::rpc::inject(&span, &mut req);
    let r = call(req).instrument(span.clone()).await;
    if r.is_err() {
        span.record("otel.status_code", "ERROR");
    }
    r.map(tonic::Response::into_inner)
}

fn channel(url: &str) -> Result<Channel, HomefeedError> {
    // Lazy: a host that is down at start-up is simply tried (and skipped) per request.
    Ok(Endpoint::from_shared(url.to_string())
        .map_err(|e| HomefeedError::InvalidArgument(format!("{url}: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_millis(300))
        .connect_lazy())
}

fn user_hash(user: &str) -> usize {
    // FNV-1a: stable across processes and releases (unlike the std hasher).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h as usize
}

impl Orchestrator {
    pub fn new(cfg: HomefeedConfig) -> Result<Self, HomefeedError> {
        if cfg.ann_hosts.is_empty() {
            return Err(HomefeedError::InvalidArgument(
                "no ANN hosts configured".into(),
            ));
        }
        let hosts = cfg
            .ann_hosts
            .iter()
            .map(|u| {
                Ok(Host {
                    url: u.clone(),
                    client: AnnSearchClient::new(channel(u)?),
                    cached: Mutex::new(None),
                    in_flight: AtomicU32::new(0),
                })
            })
            .collect::<Result<Vec<_>, HomefeedError>>()?;
        let user_tower = UserTowerClient::new(channel(&cfg.user_tower)?);
        let metrics = Registry::new();
        metrics.register(&[
            m::HF_HOSTS_PER_VERSION,
            m::HF_VERSIONS_LIVE,
            m::HF_HOSTS_UNREACHABLE,
            m::HF_ANSWERS,
            m::HF_HANDSHAKE_RETRIES,
            m::HF_VERSION_REFUSALS,
            m::HF_FAILOVERS,
        ]);
        Ok(Orchestrator {
            cfg,
            hosts,
            user_tower,
            next: AtomicUsize::new(0),
            newest: Mutex::new(None),
            metrics,
        })
    }

    /// The orchestrator's metrics (the `/metrics` endpoint renders them).
    pub fn metrics(&self) -> &Arc<Registry> {
        &self.metrics
    }

    /// Each host's served version (`None`: unreachable), asked afresh (the answer also
    /// refreshes the handshake's cache), and the version-skew gauges set from it. Run at every
    /// scrape, so the gauges are current with or without traffic.
    pub async fn observe_hosts(&self) -> Vec<(String, Option<String>)> {
        let mut seen = Vec::with_capacity(self.hosts.len());
        // One at a time keeps this simple; a dead host costs at most one RPC timeout, and each
        // host gets a full one.
        for host in &self.hosts {
            let deadline = Instant::now() + self.cfg.rpc_timeout;
            let v = self.fetch_version(host, deadline).await.ok();
            seen.push((host.url.clone(), v));
        }
        let mut per: std::collections::BTreeMap<&str, f64> = Default::default();
        for (_, v) in &seen {
            if let Some(v) = v {
                *per.entry(v.as_str()).or_default() += 1.0;
            }
        }
        let unreachable = seen.iter().filter(|(_, v)| v.is_none()).count();
        self.metrics
            .set(&m::HF_VERSIONS_LIVE, &[], per.len() as f64);
        self.metrics
            .set(&m::HF_HOSTS_UNREACHABLE, &[], unreachable as f64);
        self.metrics.replace(
            &m::HF_HOSTS_PER_VERSION,
            per.iter()
                .map(|(v, n)| (vec![("version", v.to_string())], *n))
                .collect(),
        );
        seen
    }

    /// Host indices in the order to try them for this request.
    fn order(&self, user: &str) -> Vec<usize> {
        let n = self.hosts.len();
        let first = match self.cfg.pick {
            Pick::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            Pick::Sticky => user_hash(user) % n,
            Pick::TwoChoices => {
                let a = self.next.fetch_add(1, Ordering::Relaxed) % n;
                let b = (a + 1 + user_hash(user) % n.max(2).saturating_sub(1)) % n;
                if self.hosts[b].in_flight.load(Ordering::Relaxed)
                    < self.hosts[a].in_flight.load(Ordering::Relaxed)
                {
                    b
                } else {
                    a
                }
            }
        };
        (0..n).map(|k| (first + k) % n).collect()
    }

    fn remaining(&self, deadline: Instant) -> Result<Duration, HomefeedError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HomefeedError::DeadlineExceeded);
        }
        Ok(left.min(self.cfg.rpc_timeout))
    }

    /// The host's served version: from the cache while fresh, else asked.
    async fn host_version(&self, host: &Host, deadline: Instant) -> Result<String, tonic::Status> {
        if let Some((v, at)) = host.cached.lock().expect("lock poisoned").clone() {
            if at.elapsed() < self.cfg.metadata_ttl {
                return Ok(v);
            }
        }
        self.fetch_version(host, deadline).await
    }

    /// The host's served version, asked now; the cache is updated with the answer.
    async fn fetch_version(&self, host: &Host, deadline: Instant) -> Result<String, tonic::Status> {
        let mut req = tonic::Request::new(ann::GetVersionMetadataRequest {});
        req.set_timeout(
            self.remaining(deadline)
                .map_err(|_| tonic::Status::deadline_exceeded("request deadline"))?,
        );
        let mut client = host.client.clone();
        let meta = traced(
            "tandem.ann.v1.AnnSearch/GetVersionMetadata",
            &host.url,
            req,
            |r| async move { client.get_version_metadata(r).await },
        )
        .await?;
        let v = meta
            .versions
            .get(&self.cfg.model)
            .cloned()
            .unwrap_or(meta.model_version);
        *host.cached.lock().expect("lock poisoned") = Some((v.clone(), Instant::now()));
        Ok(v)
    }

    fn invalidate(host: &Host) {
        *host.cached.lock().expect("lock poisoned") = None;
    }

    async fn newest_version(&self, deadline: Instant) -> Result<String, HomefeedError> {
        if let Some((v, at)) = self.newest.lock().expect("lock poisoned").clone() {
            if at.elapsed() < self.cfg.metadata_ttl {
                return Ok(v);
            }
        }
        let mut req = tonic::Request::new(ut::ListVersionsRequest {});
        req.set_timeout(self.remaining(deadline)?);
        let mut client = self.user_tower.clone();
        let list = traced(
            "tandem.usertower.v1.UserTower/ListVersions",
            &self.cfg.user_tower,
            req,
            |r| async move { client.list_versions(r).await },
        )
        .await
        .map_err(|s| HomefeedError::UserTower(s.message().to_string()))?;
        let newest = list
            .versions
            .iter()
            .map(|v| v.model_version.clone())
            .max_by_key(|v| v.trim_start_matches('v').parse::<u64>().unwrap_or(0))
            .ok_or_else(|| HomefeedError::UserTower("no version loaded".into()))?;
        *self.newest.lock().expect("lock poisoned") = Some((newest.clone(), Instant::now()));
        Ok(newest)
    }

    async fn embed(
        &self,
        user: &str,
        version: &str,
        deadline: Instant,
    ) -> Result<ut::EmbedResponse, tonic::Status> {
        let mut req = tonic::Request::new(ut::EmbedRequest {
            model_name: self.cfg.model.clone(),
            model_version: version.to_string(),
            user_id: user.to_string(),
            ..Default::default()
        });
        req.set_timeout(
            self.remaining(deadline)
                .map_err(|_| tonic::Status::deadline_exceeded("request deadline"))?,
        );
        let mut client = self.user_tower.clone();
        traced(
            "tandem.usertower.v1.UserTower/Embed",
            &self.cfg.user_tower,
            req,
            |r| async move { client.embed(r).await },
        )
        .await
    }

    pub async fn get_candidates(
        &self,
        user: &str,
        k: i32,
        exclude_seen: bool,
    ) -> Result<Candidates, HomefeedError> {
        if user.is_empty() {
            return Err(HomefeedError::InvalidArgument("user_id is empty".into()));
        }
        if k <= 0 || k > self.cfg.max_k {
            return Err(HomefeedError::InvalidArgument(format!(
                "k must be in 1..={}, got {k}",
                self.cfg.max_k
            )));
        }
        let span = tracing::info_span!(
            "homefeed.get_candidates",
            tandem.k = k,
            tandem.model_version = field::Empty,
            tandem.ann_host = field::Empty,
            tandem.results = field::Empty,
            tandem.attempts = field::Empty,
        );
        let out = self
            .pick_and_ask(user, k, exclude_seen)
            .instrument(span.clone())
            .await;
        if let Ok(c) = &out {
            span.record("tandem.model_version", c.index_version.as_str());
            span.record("tandem.ann_host", c.host.as_str());
            span.record("tandem.results", c.items.len());
            span.record("tandem.attempts", c.attempts);
            self.metrics
                .inc(&m::HF_ANSWERS, &[("version", c.index_version.as_str())]);
        }
        out
    }

    async fn pick_and_ask(
        &self,
        user: &str,
        k: i32,
        exclude_seen: bool,
    ) -> Result<Candidates, HomefeedError> {
        let deadline = Instant::now() + self.cfg.deadline;
        let mut reasons = Vec::new();
        let mut attempts = 0u32;
        for h in self.order(user) {
            let host = &self.hosts[h];
            host.in_flight.fetch_add(1, Ordering::Relaxed);
            let outcome = self
                .try_host(host, user, k, exclude_seen, deadline, &mut attempts)
                .await;
            host.in_flight.fetch_sub(1, Ordering::Relaxed);
            match outcome {
                Ok(c) => return Ok(c),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::NextHost(why)) => {
                    tracing::debug!(host = %host.url, reason = %why, "trying another host");
                    self.metrics.inc(&m::HF_FAILOVERS, &[]);
                    reasons.push(format!("{}: {why}", host.url));
                }
            }
            if Instant::now() >= deadline {
                return Err(HomefeedError::DeadlineExceeded);
            }
        }
        Err(HomefeedError::NoHostAnswered {
            reasons: reasons.join("; "),
        })
    }

    async fn try_host(
        &self,
        host: &Host,
        user: &str,
        k: i32,
        exclude_seen: bool,
        deadline: Instant,
        attempts: &mut u32,
    ) -> Result<Candidates, Attempt> {
        let unavailable = |s: &tonic::Status| {
            matches!(
                s.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
            )
        };
        // At most two rounds: the second only after the host refused the version it had just
        // advertised (it flipped between handshake and search).
        for round in 0..2 {
            *attempts += 1;
            let (embed_version, allow_mismatch) = match self.cfg.sync {
                SyncMode::Sync => match self.host_version(host, deadline).await {
                    Ok(v) => (v, false),
                    Err(s) => {
                        Self::invalidate(host);
                        return Err(Attempt::NextHost(format!("metadata: {}", s.message())));
                    }
                },
                SyncMode::Naive => (
                    self.newest_version(deadline)
                        .await
                        .map_err(Attempt::Fatal)?,
                    true,
                ),
            };
            let embedding = match self.embed(user, &embed_version, deadline).await {
                Ok(e) => e,
                // The user tower no longer (or not yet) holds this host's version: another host
                // may serve one it has.
                Err(s) if s.code() == Code::NotFound => {
                    self.metrics
                        .inc(&m::HF_VERSION_REFUSALS, &[("source", "user_tower")]);
                    return Err(Attempt::NextHost(format!(
                        "user tower lacks {embed_version}"
                    )));
                }
                Err(s) if s.code() == Code::InvalidArgument => {
                    return Err(Attempt::Fatal(HomefeedError::InvalidArgument(
                        s.message().to_string(),
                    )))
                }
                Err(s) => {
                    return Err(Attempt::Fatal(HomefeedError::UserTower(
                        s.message().to_string(),
                    )))
                }
            };
            if let Some(hook) = &self.cfg.between_embed_and_search {
                hook(&host.url).await;
            }
            let seen: HashSet<String> = if exclude_seen {
                embedding.history.iter().cloned().collect()
            } else {
                HashSet::new()
            };
            let ask = (k as usize + seen.len()).min(self.cfg.max_k as usize) as i32;
            let mut req = tonic::Request::new(ann::SearchRequest {
                model_name: self.cfg.model.clone(),
                model_version: embed_version.clone(),
                embedding: embedding.embedding,
                k: ask,
                ef: None,
                allow_version_mismatch: allow_mismatch,
            });
            req.set_timeout(self.remaining(deadline).map_err(Attempt::Fatal)?);
            let mut client = host.client.clone();
            let searched = traced(
                "tandem.ann.v1.AnnSearch/Search",
                &host.url,
                req,
                |r| async move { client.search(r).await },
            )
            .await;
            match searched {
                Ok(r) => {
                    // Belt and braces: in sync mode the host already refused any other version.
                    if self.cfg.sync == SyncMode::Sync && r.model_version != embed_version {
                        Self::invalidate(host);
                        return Err(Attempt::NextHost(format!(
                            "answered from {} for a {embed_version} embedding",
                            r.model_version
                        )));
                    }
                    let items: Vec<(String, f32)> = r
                        .items
                        .into_iter()
                        .filter(|i| !seen.contains(&i.item_id))
                        .take(k as usize)
                        .map(|i| (i.item_id, i.score))
                        .collect();
                    return Ok(Candidates {
                        items,
                        model_name: self.cfg.model.clone(),
                        index_version: r.model_version,
                        embedding_version: embed_version,
                        host: host.url.clone(),
                        attempts: *attempts,
                    });
                }
                Err(s) if s.code() == Code::FailedPrecondition => {
                    Self::invalidate(host);
                    self.metrics
                        .inc(&m::HF_VERSION_REFUSALS, &[("source", "ann")]);
                    if round == 0 {
                        self.metrics.inc(&m::HF_HANDSHAKE_RETRIES, &[]);
                    }
                    if round == 1 {
                        return Err(Attempt::NextHost(format!("refused twice: {}", s.message())));
                    }
                }
                Err(s) if unavailable(&s) => {
                    Self::invalidate(host);
                    return Err(Attempt::NextHost(format!("search: {}", s.message())));
                }
                Err(s) => {
                    return Err(Attempt::NextHost(format!(
                        "search: {:?}: {}",
                        s.code(),
                        s.message()
                    )))
                }
            }
        }
        Err(Attempt::NextHost("retry budget spent".into()))
    }
}

enum Attempt {
    NextHost(String),
    Fatal(HomefeedError),
}
