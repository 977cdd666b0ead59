//! The per-request protocol (see the crate docs).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tandem_client::{
    AnnClient, ClientError, ClientOptions, EmbedQuery, SearchQuery, UserTowerClient,
};
use tandem_telemetry::{catalogue as m, Registry};
use tandem_types::{error_chain, ModelVersion};
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

/// A failure of the server or the way to it (down, too slow, not ready), not of the request:
/// another replica or host may answer.
fn unreachable_or_slow(e: &ClientError) -> bool {
    matches!(
        e.code(),
        None | Some(Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown)
    )
}

/// How long a user-tower replica that failed to answer is tried after the others.
const USER_TOWER_PENALTY: Duration = Duration::from_secs(2);

/// One GetCandidates request.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub user: &'a str,
    pub k: i32,
    /// Leave out the items in the user's recent history.
    pub exclude_seen: bool,
    /// Embed only from user state that includes this engagement sequence.
    pub min_sequence: Option<u64>,
}

#[derive(Clone)]
pub struct HomefeedConfig {
    pub model: String,
    /// ANN host URLs (`http://host:port`).
    pub ann_hosts: Vec<String>,
    /// User-tower replicas (`http://host:port`); each request starts at the next one and fails
    /// over to the others.
    pub user_towers: Vec<String>,
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
    /// How the orchestrator connects to the hosts and the user tower (TLS for https://).
    pub client: ClientOptions,
}

impl HomefeedConfig {
    pub fn new(model: &str, ann_hosts: Vec<String>, user_towers: Vec<String>) -> Self {
        HomefeedConfig {
            model: model.to_string(),
            ann_hosts,
            user_towers,
            pick: Pick::RoundRobin,
            sync: SyncMode::Sync,
            metadata_ttl: Duration::from_millis(500),
            deadline: Duration::from_secs(2),
            rpc_timeout: Duration::from_millis(500),
            max_k: 1000,
            between_embed_and_search: None,
            client: ClientOptions::default(),
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
    /// The user tower failed the request; `code` is its status (UNAVAILABLE when it could not
    /// be reached), which the orchestrator relays.
    #[error("user tower")]
    UserTower {
        code: tonic::Code,
        #[source]
        source: ClientError,
    },
    #[error("invalid service address")]
    Address(#[source] ClientError),
}

impl HomefeedError {
    fn user_tower(source: ClientError) -> Self {
        HomefeedError::UserTower {
            code: source.relay_code(),
            source,
        }
    }
}

/// An answer: items plus where they came from.
#[derive(Debug, Clone)]
pub struct Candidates {
    pub items: Vec<(String, f32)>,
    pub model_name: String,
    /// The version of the index that answered.
    pub index_version: ModelVersion,
    /// The version the user embedding came from.
    pub embedding_version: ModelVersion,
    pub host: String,
    pub attempts: u32,
}

mod sharded;

/// Two numbers and when they were set, read and written without a lock: every request reads
/// a host's cached metadata and the user tower replicas' failure times, and a lock there
/// would serialise the request path.
///
/// A writer clears the time, stores the numbers, then stores the new time; a reader takes the
/// numbers only if the time is set and reads the same before and after them. Two writers
/// racing can at worst pair one's numbers with the other's time, both fresh answers of the
/// same host; the version promise does not rest on this cache (a host refuses a search for a
/// version it does not serve), a stale entry costs one more handshake.
#[derive(Default)]
struct Stamp {
    /// Microseconds since [`epoch`] plus one; 0 when unset.
    at: AtomicU64,
    a: AtomicU64,
    b: AtomicU64,
}

/// The process's reference instant for [`Stamp`] times.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn micros_now() -> u64 {
    epoch().elapsed().as_micros() as u64 + 1
}

impl Stamp {
    fn set(&self, a: u64, b: u64) {
        self.at.store(0, Ordering::SeqCst);
        self.a.store(a, Ordering::SeqCst);
        self.b.store(b, Ordering::SeqCst);
        self.at.store(micros_now(), Ordering::SeqCst);
    }

    fn clear(&self) {
        self.at.store(0, Ordering::SeqCst);
    }

    /// The numbers, if set less than `ttl` ago.
    fn get(&self, ttl: Duration) -> Option<(u64, u64)> {
        let at = self.at.load(Ordering::SeqCst);
        if at == 0 {
            return None;
        }
        let (a, b) = (self.a.load(Ordering::SeqCst), self.b.load(Ordering::SeqCst));
        let fresh = micros_now().saturating_sub(at) < ttl.as_micros() as u64;
        (self.at.load(Ordering::SeqCst) == at && fresh).then_some((a, b))
    }
}

struct Host {
    client: AnnClient,
    /// The host's version and shape (`shard << 32 | shard count`) from its last metadata.
    cached: Stamp,
    in_flight: AtomicU32,
}

impl Host {
    fn url(&self) -> &str {
        self.client.url()
    }

    fn invalidate(&self) {
        self.cached.clear();
    }

    /// The cached version while fresh.
    fn cached_version(&self, ttl: Duration) -> Option<ModelVersion> {
        self.cached.get(ttl).map(|(v, _)| ModelVersion(v))
    }
}

/// One host and the version it advertised. An embedding is requested for exactly this version,
/// and the resulting [`Embedded`] can only be searched on this host: a request embedded for one
/// version and searched on another cannot be written.
struct Handshake<'a> {
    host: &'a Host,
    version: ModelVersion,
    /// Naive mode only: the host answers even from another version.
    allow_mismatch: bool,
}

/// A user embedding bound to the handshake it was made for.
struct Embedded<'a> {
    handshake: Handshake<'a>,
    vector: Vec<f32>,
    history: Vec<String>,
}

pub struct Orchestrator {
    cfg: HomefeedConfig,
    hosts: Vec<Host>,
    user_towers: Vec<UserTowerClient>,
    /// When each replica last failed to answer: it is tried last for a while after.
    user_tower_failed: Vec<Stamp>,
    next: AtomicUsize,
    next_user_tower: AtomicUsize,
    /// Whether the hosts serve shards ([`sharded::UNKNOWN`] until a host said).
    sharded: std::sync::atomic::AtomicU8,
    /// The newest version the user towers serve (naive mode), and when it was asked.
    newest: Stamp,
    metrics: Arc<Registry>,
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
        // Lazy channels: a host that is down at start-up is simply tried (and skipped) per
        // request.
        let opts = ClientOptions {
            connect_timeout: Duration::from_millis(300),
            ..cfg.client.clone()
        };
        let hosts = cfg
            .ann_hosts
            .iter()
            .map(|u| {
                Ok(Host {
                    client: AnnClient::lazy(u, &opts).map_err(HomefeedError::Address)?,
                    cached: Stamp::default(),
                    in_flight: AtomicU32::new(0),
                })
            })
            .collect::<Result<Vec<_>, HomefeedError>>()?;
        if cfg.user_towers.is_empty() {
            return Err(HomefeedError::InvalidArgument(
                "no user tower configured".into(),
            ));
        }
        let user_towers = cfg
            .user_towers
            .iter()
            .map(|u| UserTowerClient::lazy(u, &opts).map_err(HomefeedError::Address))
            .collect::<Result<Vec<_>, HomefeedError>>()?;
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
            user_tower_failed: user_towers.iter().map(|_| Stamp::default()).collect(),
            user_towers,
            next: AtomicUsize::new(0),
            next_user_tower: AtomicUsize::new(0),
            sharded: std::sync::atomic::AtomicU8::new(sharded::UNKNOWN),
            newest: Stamp::default(),
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
    pub async fn observe_hosts(&self) -> Vec<(String, Option<ModelVersion>)> {
        let mut seen = Vec::with_capacity(self.hosts.len());
        // One at a time keeps this simple; a dead host costs at most one RPC timeout, and each
        // host gets a full one.
        for host in &self.hosts {
            let deadline = Instant::now() + self.cfg.rpc_timeout;
            let v = self.fetch_version(host, deadline).await.ok();
            seen.push((host.url().to_string(), v));
        }
        let mut per: std::collections::BTreeMap<ModelVersion, f64> = Default::default();
        for v in seen.iter().filter_map(|(_, v)| *v) {
            *per.entry(v).or_default() += 1.0;
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
    fn order(&self, user: &str) -> impl Iterator<Item = usize> {
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
        (0..n).map(move |k| (first + k) % n)
    }

    /// The time left for one RPC: the rest of the request's deadline, at most `rpc_timeout`.
    fn remaining(&self, deadline: Instant) -> Result<Duration, HomefeedError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HomefeedError::DeadlineExceeded);
        }
        Ok(left.min(self.cfg.rpc_timeout))
    }

    /// The host's served version: from the cache while fresh, else asked.
    async fn host_version(&self, host: &Host, deadline: Instant) -> Result<ModelVersion, Attempt> {
        if let Some(v) = host.cached_version(self.cfg.metadata_ttl) {
            return Ok(v);
        }
        self.fetch_version(host, deadline).await
    }

    /// The host's served version, asked now; the cache is updated with the answer.
    async fn fetch_version(&self, host: &Host, deadline: Instant) -> Result<ModelVersion, Attempt> {
        let timeout = self.remaining(deadline).map_err(Attempt::Fatal)?;
        let meta = host.client.metadata(Some(timeout)).await.map_err(|e| {
            host.invalidate();
            Attempt::NextHost(format!("metadata: {}", error_chain(&e)))
        })?;
        let v = meta.version_of(&self.cfg.model);
        if meta.shard_count > 1 {
            self.sharded.store(sharded::SHARDED, Ordering::Relaxed);
        }
        host.cached
            .set(v.0, (meta.shard as u64) << 32 | meta.shard_count as u64);
        Ok(v)
    }

    /// The newest version the user tower serves (naive mode).
    async fn newest_version(&self, deadline: Instant) -> Result<ModelVersion, HomefeedError> {
        if let Some((v, _)) = self.newest.get(self.cfg.metadata_ttl) {
            return Ok(ModelVersion(v));
        }
        let mut list = Err(HomefeedError::InvalidArgument(
            "no user tower configured".into(),
        ));
        for i in self.user_tower_order() {
            list = self.user_towers[i]
                .versions(Some(self.remaining(deadline)?))
                .await
                .map_err(HomefeedError::user_tower);
            if list.is_ok() {
                break;
            }
        }
        let list = list?;
        let newest = list.iter().map(|v| v.version).max().ok_or_else(|| {
            HomefeedError::InvalidArgument("the user tower has no version loaded".into())
        })?;
        self.newest.set(newest.0, 0);
        Ok(newest)
    }

    pub async fn get_candidates(
        &self,
        user: &str,
        k: i32,
        exclude_seen: bool,
    ) -> Result<Candidates, HomefeedError> {
        self.get_candidates_after(&Ask {
            user,
            k,
            exclude_seen,
            min_sequence: None,
        })
        .await
    }

    /// The user tower replicas in the order to try them for one request: round-robin, with
    /// the replicas that failed in the last [`USER_TOWER_PENALTY`] after the others. Decided
    /// once, up front: a replica that fails during this request is not tried a second time,
    /// and one whose penalty ends meanwhile is not skipped by both passes of a lazy order.
    fn user_tower_order(&self) -> Vec<usize> {
        let n = self.user_towers.len();
        let first = self.next_user_tower.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<usize> = (0..n).map(|k| (first + k) % n).collect();
        order.sort_by_key(|&i| self.user_tower_failed[i].get(USER_TOWER_PENALTY).is_some());
        order
    }

    pub async fn get_candidates_after(&self, ask: &Ask<'_>) -> Result<Candidates, HomefeedError> {
        let (user, k) = (ask.user, ask.k);
        if user.is_empty() {
            return Err(HomefeedError::InvalidArgument("user_id is empty".into()));
        }
        if user.len() > 256 {
            return Err(HomefeedError::InvalidArgument(
                "user_id may be at most 256 bytes".into(),
            ));
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
        let out = self.pick_and_ask(ask).instrument(span.clone()).await;
        if let Ok(c) = &out {
            let text = VersionText::new(c.index_version);
            let version = text.as_str();
            span.record("tandem.model_version", version);
            span.record("tandem.ann_host", c.host.as_str());
            span.record("tandem.results", c.items.len());
            span.record("tandem.attempts", c.attempts);
            self.metrics.inc(&m::HF_ANSWERS, &[("version", version)]);
        }
        out
    }

    async fn pick_and_ask(&self, ask: &Ask<'_>) -> Result<Candidates, HomefeedError> {
        let deadline = Instant::now() + self.cfg.deadline;
        if self.is_sharded(deadline).await {
            return match self.cfg.sync {
                SyncMode::Sync => self.pick_and_ask_sharded(ask, deadline).await,
                SyncMode::Naive => self.naive_sharded(ask, deadline).await,
            };
        }
        let mut reasons = Vec::new();
        let mut attempts = 0u32;
        for h in self.order(ask.user) {
            let host = &self.hosts[h];
            host.in_flight.fetch_add(1, Ordering::Relaxed);
            let outcome = self.try_host(host, ask, deadline, &mut attempts).await;
            host.in_flight.fetch_sub(1, Ordering::Relaxed);
            match outcome {
                Ok(c) => return Ok(c),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::NextHost(why)) => {
                    tracing::debug!(host = %host.url(), reason = %why, "trying another host");
                    self.metrics.inc(&m::HF_FAILOVERS, &[]);
                    reasons.push(format!("{}: {why}", host.url()));
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

    /// Step 1–2: which version this host serves (or, in naive mode, the newest one).
    async fn handshake<'a>(
        &self,
        host: &'a Host,
        deadline: Instant,
    ) -> Result<Handshake<'a>, Attempt> {
        Ok(match self.cfg.sync {
            SyncMode::Sync => Handshake {
                host,
                version: self.host_version(host, deadline).await?,
                allow_mismatch: false,
            },
            SyncMode::Naive => Handshake {
                host,
                version: self
                    .newest_version(deadline)
                    .await
                    .map_err(Attempt::Fatal)?,
                allow_mismatch: true,
            },
        })
    }

    /// Step 3: the user's embedding by exactly the handshake's version, from the first user
    /// tower replica that answers. A replica that is unreachable, too slow, not ready or
    /// behind `min_sequence` is passed over for the next; when replicas lack the version (and
    /// none answered), another ANN host may serve one they have.
    async fn embed<'a>(
        &self,
        hs: Handshake<'a>,
        ask: &Ask<'_>,
        deadline: Instant,
    ) -> Result<Embedded<'a>, Attempt> {
        let mut lacking = false;
        let mut failed = None;
        for i in self.user_tower_order() {
            let ut = &self.user_towers[i];
            let timeout = self.remaining(deadline).map_err(Attempt::Fatal)?;
            let mut q = EmbedQuery::user(ask.user);
            q.model_name = self.cfg.model.clone();
            q.min_sequence = ask.min_sequence;
            match ut.embed(hs.version, q, Some(timeout)).await {
                Ok(e) => {
                    return Ok(Embedded {
                        handshake: hs,
                        vector: e.vector,
                        history: e.history,
                    })
                }
                // This replica no longer (or not yet) holds the host's version.
                Err(e) if e.code() == Some(Code::NotFound) => lacking = true,
                Err(e) if e.code() == Some(Code::InvalidArgument) => {
                    return Err(Attempt::Fatal(HomefeedError::InvalidArgument(match &e {
                        ClientError::Rpc { status, .. } => status.message().to_string(),
                        other => other.to_string(),
                    })))
                }
                Err(e) if unreachable_or_slow(&e) => {
                    tracing::debug!(user_tower = %ut.url(), error = %error_chain(&e), "trying another user tower replica");
                    self.user_tower_failed[i].set(0, 0);
                    if self.user_towers.len() > 1 {
                        self.metrics.inc(&m::HF_FAILOVERS, &[]);
                    }
                    failed = Some(e);
                }
                Err(e) => return Err(Attempt::Fatal(HomefeedError::user_tower(e))),
            }
        }
        if lacking {
            self.metrics
                .inc(&m::HF_VERSION_REFUSALS, &[("source", "user_tower")]);
            return Err(Attempt::NextHost(format!(
                "user tower lacks {}",
                hs.version
            )));
        }
        Err(Attempt::Fatal(match failed {
            Some(e) => HomefeedError::user_tower(e),
            None => HomefeedError::InvalidArgument("no user tower configured".into()),
        }))
    }

    /// Step 4: search the handshake's host, stating the handshake's version.
    async fn search(
        &self,
        e: Embedded<'_>,
        k: i32,
        exclude_seen: bool,
        deadline: Instant,
        attempts: u32,
    ) -> Result<Candidates, Searched> {
        let Embedded {
            handshake: hs,
            vector,
            history,
        } = e;
        // The host skips the seen items inside its graph walk and still answers k.
        let probe = Probe {
            vector,
            k,
            exclude: if exclude_seen { history } else { Vec::new() },
        };
        let (version, items) = self.ask_host(&hs, probe, deadline).await?;
        Ok(Candidates {
            items,
            model_name: self.cfg.model.clone(),
            index_version: version,
            embedding_version: hs.version,
            host: hs.host.url().to_string(),
            attempts,
        })
    }

    /// One Search on the handshake's host for its version: the version that answered and the
    /// items. A refusal of the version (the host flipped) invalidates the host's cached
    /// metadata and counts in the refusal metric; so does an unreachable or slow host (the
    /// cache only); in sync mode an answer from another version is a failure too.
    async fn ask_host(
        &self,
        hs: &Handshake<'_>,
        probe: Probe,
        deadline: Instant,
    ) -> Result<(ModelVersion, Vec<(String, f32)>), Searched> {
        let timeout = self
            .remaining(deadline)
            .map_err(|e| Searched::Failed(Attempt::Fatal(e)))?;
        let query = SearchQuery {
            model_name: self.cfg.model.clone(),
            version: hs.version,
            embedding: probe.vector,
            k: probe.k,
            ef: None,
            allow_version_mismatch: hs.allow_mismatch,
            exclude: probe.exclude,
        };
        let r = match hs.host.client.search(query, Some(timeout)).await {
            Ok(r) => r,
            Err(e) if e.code() == Some(Code::FailedPrecondition) => {
                hs.host.invalidate();
                self.metrics
                    .inc(&m::HF_VERSION_REFUSALS, &[("source", "ann")]);
                return Err(Searched::Refused(error_chain(&e)));
            }
            Err(e) => {
                if unreachable_or_slow(&e) {
                    hs.host.invalidate();
                }
                return Err(Searched::Failed(Attempt::NextHost(format!(
                    "search: {}",
                    error_chain(&e)
                ))));
            }
        };
        // Belt and braces: in sync mode the host already refused any other version.
        if !hs.allow_mismatch && r.version != hs.version {
            hs.host.invalidate();
            return Err(Searched::Failed(Attempt::NextHost(format!(
                "answered from {} for a {} embedding",
                r.version, hs.version
            ))));
        }
        Ok((r.version, r.items))
    }

    async fn try_host(
        &self,
        host: &Host,
        ask: &Ask<'_>,
        deadline: Instant,
        attempts: &mut u32,
    ) -> Result<Candidates, Attempt> {
        // At most two rounds: the second only after the host refused the version it had just
        // advertised (it flipped between handshake and search).
        for round in 0..2 {
            *attempts += 1;
            let hs = self.handshake(host, deadline).await?;
            let embedded = self.embed(hs, ask, deadline).await?;
            if let Some(hook) = &self.cfg.between_embed_and_search {
                hook(host.url()).await;
            }
            match self
                .search(embedded, ask.k, ask.exclude_seen, deadline, *attempts)
                .await
            {
                Ok(c) => return Ok(c),
                Err(Searched::Failed(a)) => return Err(a),
                Err(Searched::Refused(why)) if round == 0 => {
                    tracing::debug!(host = %host.url(), reason = %why, "host switched version; redoing the handshake");
                    self.metrics.inc(&m::HF_HANDSHAKE_RETRIES, &[]);
                }
                Err(Searched::Refused(why)) => {
                    return Err(Attempt::NextHost(format!("refused twice: {why}")))
                }
            }
        }
        Err(Attempt::NextHost("retry budget spent".into()))
    }
}

/// A version as its text (`v12`), written on the stack: the answer counter's label and the
/// span field need it on every request.
struct VersionText {
    buf: [u8; 21],
    start: usize,
}

impl VersionText {
    fn new(v: ModelVersion) -> Self {
        let mut buf = [0u8; 21];
        let mut start = buf.len();
        let mut n = v.0;
        loop {
            start -= 1;
            buf[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        start -= 1;
        buf[start] = b'v';
        VersionText { buf, start }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[self.start..]).expect("ASCII digits")
    }
}

/// What one Search asks of a host: the embedding, k, and the items to leave out.
#[derive(Clone)]
struct Probe {
    vector: Vec<f32>,
    k: i32,
    exclude: Vec<String>,
}

enum Attempt {
    NextHost(String),
    Fatal(HomefeedError),
}

/// How a search failed: the host refused the embedding's version (it flipped since the
/// handshake; worth one more handshake), or anything else.
enum Searched {
    Refused(String),
    Failed(Attempt),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_text_matches_display_and_stamps_expire() {
        for v in [0u64, 7, 10, 12_345, u64::MAX] {
            let v = ModelVersion(v);
            assert_eq!(VersionText::new(v).as_str(), v.to_string());
        }
        let s = Stamp::default();
        assert_eq!(s.get(Duration::from_secs(60)), None, "unset");
        s.set(3, 1 << 32 | 2);
        assert_eq!(s.get(Duration::from_secs(60)), Some((3, 1 << 32 | 2)));
        assert_eq!(s.get(Duration::ZERO), None, "older than a zero ttl");
        s.clear();
        assert_eq!(s.get(Duration::from_secs(60)), None, "cleared");
    }
}
