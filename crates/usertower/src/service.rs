//! The user-tower service's domain logic, free of gRPC: the set of loaded versions (kept in
//! sync with the registry), the online store and the durable log.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tandem_model::UserModel;
use tandem_registry::{Registry, Storage};
use tandem_telemetry::catalogue as m;
use tandem_types::clock::{now_unix, now_unix_ms};
use tandem_types::{ModelVersion, MODELS};

use tandem_stream::{Delivered, EventStream, NatsOptions};

use crate::batch::{embed_jobs, Batcher, EmbedBatching, Job};
use crate::online::{Event, EventLogWriter, Fsync, OnlineStore};

/// Replicated mode: engagement lives in a NATS JetStream stream every replica follows.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub nats: NatsOptions,
    /// On start a replica rebuilds its state from the messages of this window.
    pub state_window: Duration,
    /// A replica whose oldest unapplied message is older than this reports NOT_SERVING.
    pub max_lag: Duration,
}

#[derive(Debug, Clone)]
pub struct UserTowerConfig {
    pub artifacts: PathBuf,
    pub model: String,
    /// Keep the newest N versions loaded (plus any pinned ones).
    pub keep: usize,
    pub poll: Duration,
    pub event_log: PathBuf,
    pub fsync: Fsync,
    pub segment_bytes: u64,
    /// Events more than this far in the future are rejected (clock skew allowance).
    pub max_future_skew: Duration,
    /// Events older than this are rejected.
    pub max_event_age: Duration,
    /// Recent events kept per user: a version sees at most this many (its L plus its
    /// long-history summary should fit).
    pub history_cap: usize,
    /// Replicated mode; `None`: the embedded local log in `event_log`.
    pub nats: Option<NatsConfig>,
    /// Longest an Embed with `min_sequence` waits for this replica to apply it.
    pub max_sequence_wait: Duration,
    /// Drill only: sleep this long after applying each stream message (a slow replica).
    pub fault_apply_delay: Duration,
    /// Micro-batching of Embed calls (off by default: measured slower, see the README).
    pub embed_batching: EmbedBatching,
}

impl UserTowerConfig {
    pub fn new(artifacts: PathBuf, model: &str, event_log: PathBuf) -> Self {
        UserTowerConfig {
            artifacts,
            model: model.to_string(),
            keep: 3,
            poll: Duration::from_secs(2),
            event_log,
            fsync: Fsync::Always,
            segment_bytes: 64 << 20,
            max_future_skew: Duration::from_secs(300),
            max_event_age: Duration::from_secs(30 * 86_400),
            history_cap: 250,
            nats: None,
            max_sequence_wait: Duration::from_secs(1),
            fault_apply_delay: Duration::ZERO,
            embed_batching: EmbedBatching::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UserTowerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{model} {requested} is not loaded (loaded: {loaded})")]
    VersionNotLoaded {
        model: String,
        requested: ModelVersion,
        loaded: String,
    },
    #[error("no model version loaded yet")]
    NothingLoaded,
    #[error("event log: {0}")]
    Log(String),
    /// Replicated mode: this replica's state is being rebuilt or is too far behind the stream.
    #[error("replica not ready: {0}")]
    NotReady(String),
    /// This replica has not applied the sequence the caller needs (yet): another may have.
    #[error("this replica has applied up to sequence {applied}, the request needs {wanted}")]
    Behind { applied: u64, wanted: u64 },
    #[error("{0}")]
    Internal(String),
}

pub struct Loaded {
    pub model: UserModel,
    pub loaded_at_ms: i64,
    pub feature_schema_hash: String,
    pub dim: usize,
}

pub struct EmbedInput {
    /// Empty: this service's model.
    pub model_name: String,
    pub model_version: ModelVersion,
    pub user_id: String,
    pub recent_items: Vec<String>,
    pub features: HashMap<String, String>,
    pub request_time: Option<i64>,
    /// Wait (bounded) until this replica has applied this engagement sequence.
    pub min_sequence: Option<u64>,
}

pub struct Embedding {
    pub vector: Vec<f32>,
    /// The history the embedding saw (most recent first, as given or stored).
    pub history: Vec<String>,
    pub version: ModelVersion,
    pub history_length: usize,
}

pub struct RecordOutcome {
    pub accepted: u64,
    pub rejected: u64,
    pub errors: Vec<String>,
    /// The sequence of the last accepted event's message (stream mode) or its position in the
    /// local log; an Embed with this `min_sequence` sees the events.
    pub sequence: u64,
}

/// Where accepted events go before they count as recorded.
enum Sink {
    Local(Mutex<EventLogWriter>),
    Nats(Box<EventStream>),
}

/// How far this replica has come in the engagement sequence, and whether it may serve.
struct Replication {
    applied: tokio::sync::watch::Sender<u64>,
    /// Stream mode: caught up with the stream's end at least once since start.
    caught_up: AtomicBool,
    /// Stream mode: why this replica should not serve right now (None: it may).
    problem: Mutex<Option<String>>,
}

/// Longest id or action string accepted.
pub const MAX_ID: usize = 256;
/// Most events one RecordEngagementBatch may carry.
pub const MAX_BATCH: usize = 10_000;
/// Most recent items, and features, one Embed may carry.
pub const MAX_EMBED_ITEMS: usize = 1_000;

fn check_embed_bounds(req: &EmbedInput) -> Result<(), UserTowerError> {
    let too_long = |s: &String| s.len() > MAX_ID;
    if too_long(&req.user_id) || too_long(&req.model_name) {
        return Err(UserTowerError::InvalidArgument(format!(
            "user_id and model_name may be at most {MAX_ID} bytes"
        )));
    }
    if req.recent_items.len() > MAX_EMBED_ITEMS || req.features.len() > MAX_EMBED_ITEMS {
        return Err(UserTowerError::InvalidArgument(format!(
            "at most {MAX_EMBED_ITEMS} recent_items and features"
        )));
    }
    if req.recent_items.iter().any(too_long)
        || req.features.iter().any(|(k, v)| too_long(k) || too_long(v))
    {
        return Err(UserTowerError::InvalidArgument(format!(
            "recent items and feature names and values may be at most {MAX_ID} bytes"
        )));
    }
    Ok(())
}

pub struct UserTower {
    cfg: UserTowerConfig,
    registry: Registry,
    versions: RwLock<BTreeMap<ModelVersion, Arc<Loaded>>>,
    pinned: RwLock<BTreeSet<ModelVersion>>,
    store: RwLock<OnlineStore>,
    sink: Sink,
    replication: Replication,
    /// Versions that failed to load, with polls since (for the retry back-off).
    failed: Mutex<HashMap<ModelVersion, u64>>,
    metrics: Arc<tandem_telemetry::Registry>,
    batcher: std::sync::OnceLock<Batcher>,
}

impl UserTower {
    /// Opens the event log (rebuilding the online state from it); loads no model yet.
    pub fn open(cfg: UserTowerConfig) -> Result<Self, UserTowerError> {
        let (log, events) = EventLogWriter::open(&cfg.event_log, cfg.fsync, cfg.segment_bytes)
            .map_err(UserTowerError::Log)?;
        let mut store = OnlineStore::new(cfg.history_cap);
        store.record_all(&events);
        tracing::info!(
            events = events.len(),
            users = store.users(),
            "online state rebuilt from the event log"
        );
        let me = Self::new(cfg, store, Sink::Local(Mutex::new(log)));
        me.set_applied(events.len() as u64);
        me.replication.caught_up.store(true, Ordering::Relaxed);
        Ok(me)
    }

    /// Replicated mode: the state is built by following `stream` (see [`crate::replica`]);
    /// until that caught up the service reports NOT_SERVING.
    pub fn open_replica(cfg: UserTowerConfig, stream: EventStream) -> Self {
        let store = OnlineStore::new(cfg.history_cap);
        let me = Self::new(cfg, store, Sink::Nats(Box::new(stream)));
        *me.replication.problem.lock().expect("lock poisoned") =
            Some("rebuilding the engagement state from the stream".into());
        me
    }

    fn new(cfg: UserTowerConfig, store: OnlineStore, sink: Sink) -> Self {
        let metrics = tandem_telemetry::Registry::new();
        metrics.register(&[
            m::UT_VERSIONS_LOADED,
            m::UT_EMBEDDINGS,
            m::UT_VERSION_REFUSALS,
            m::UT_EVENTS,
            m::UT_LOAD_FAILURES,
            m::UT_APPLIED_SEQUENCE,
        ]);
        if cfg.nats.is_some() {
            metrics.register(&[m::UT_REPLICATION_LAG]);
        }
        if cfg.embed_batching.enabled() {
            metrics.register(&[m::UT_EMBED_BATCHES]);
        }
        UserTower {
            metrics,
            registry: Registry::open(&cfg.artifacts),
            cfg,
            versions: RwLock::new(BTreeMap::new()),
            pinned: RwLock::new(BTreeSet::new()),
            store: RwLock::new(store),
            sink,
            replication: Replication {
                applied: tokio::sync::watch::channel(0).0,
                caught_up: AtomicBool::new(false),
                problem: Mutex::new(None),
            },
            failed: Mutex::new(HashMap::new()),
            batcher: std::sync::OnceLock::new(),
        }
    }

    /// The engagement stream, in replicated mode.
    pub fn stream(&self) -> Option<&EventStream> {
        match &self.sink {
            Sink::Nats(s) => Some(s),
            Sink::Local(_) => None,
        }
    }

    /// The last sequence applied to the online state.
    pub fn applied(&self) -> u64 {
        *self.replication.applied.borrow()
    }

    fn set_applied(&self, seq: u64) {
        self.replication.applied.send_replace(seq);
        self.metrics.set(&m::UT_APPLIED_SEQUENCE, &[], seq as f64);
    }

    /// Applies one stream message unless it was applied already (a redelivery after a
    /// reconnect): the state changes once per sequence.
    pub fn apply(&self, d: &Delivered) {
        if d.sequence <= self.applied() {
            return;
        }
        self.store
            .write()
            .expect("lock poisoned")
            .record_all(&d.events);
        self.set_applied(d.sequence);
    }

    /// Marks a stretch of the stream as passed over without events for this replica (before
    /// its state window): readiness counts it as applied.
    pub fn skip_to(&self, seq: u64) {
        if seq > self.applied() {
            self.set_applied(seq);
        }
    }

    /// Records the replication check: `lag` seconds behind, and whether the replica is caught
    /// up now; updates the reason not to serve ([`Self::not_ready`]).
    pub fn set_replication(&self, lag_s: f64, caught_up_now: bool) {
        self.metrics.set(&m::UT_REPLICATION_LAG, &[], lag_s);
        if caught_up_now {
            self.replication.caught_up.store(true, Ordering::Relaxed);
        }
        let max = self
            .cfg
            .nats
            .as_ref()
            .map_or(f64::INFINITY, |n| n.max_lag.as_secs_f64());
        let problem = if !self.replication.caught_up.load(Ordering::Relaxed) {
            Some(format!(
                "rebuilding the engagement state from the stream (applied up to sequence {})",
                self.applied()
            ))
        } else if lag_s > max {
            Some(format!(
                "replication lag {lag_s:.1}s is over the --max-lag-s bound of {max:.0}s"
            ))
        } else {
            None
        };
        let mut slot = self.replication.problem.lock().expect("lock poisoned");
        if *slot != problem {
            match &problem {
                Some(p) => tracing::warn!(reason = %p, "replica not ready"),
                None => tracing::info!(applied = self.applied(), "replica caught up"),
            }
            *slot = problem;
        }
    }

    /// Why this service must report NOT_SERVING right now, if it must.
    pub fn not_ready(&self) -> Option<String> {
        if self.loaded().is_empty() {
            return Some("no model version loaded yet".into());
        }
        self.replication
            .problem
            .lock()
            .expect("lock poisoned")
            .clone()
    }

    /// Waits until `seq` is applied, at most `max_sequence_wait`.
    async fn wait_applied(&self, seq: u64) -> Result<(), UserTowerError> {
        let mut rx = self.replication.applied.subscribe();
        let reached = tokio::time::timeout(self.cfg.max_sequence_wait, rx.wait_for(|&a| a >= seq))
            .await
            .is_ok_and(|r| r.is_ok());
        if reached {
            Ok(())
        } else {
            Err(UserTowerError::Behind {
                applied: self.applied(),
                wanted: seq,
            })
        }
    }

    pub fn config(&self) -> &UserTowerConfig {
        &self.cfg
    }

    /// This service's metrics (the `/metrics` endpoint renders them).
    pub fn metrics(&self) -> &Arc<tandem_telemetry::Registry> {
        &self.metrics
    }

    pub fn loaded(&self) -> Vec<(ModelVersion, Arc<Loaded>)> {
        self.versions
            .read()
            .expect("lock poisoned")
            .iter()
            .map(|(v, l)| (*v, l.clone()))
            .collect()
    }

    pub fn is_pinned(&self, v: ModelVersion) -> bool {
        self.pinned.read().expect("lock poisoned").contains(&v)
    }

    /// Brings the loaded set in line with the registry: the newest `keep` versions *that load*
    /// plus every pinned one (the versions ANN hosts serve and would roll back to are pinned by
    /// the hosts and by fleet operations). A version that fails to load or verify is logged,
    /// counted in `tandem_usertower_version_load_failures_total`, never counts toward `keep`
    /// and never displaces a loadable version; it is retried after a back-off. Returns (loaded,
    /// evicted).
    pub async fn refresh(&self) -> Result<(Vec<ModelVersion>, Vec<ModelVersion>), UserTowerError> {
        let listed = self
            .registry
            .list(MODELS, &self.cfg.model)
            .map_err(|e| UserTowerError::Internal(e.to_string()))?;
        let pinned = self
            .registry
            .storage
            .pinned(MODELS, &self.cfg.model)
            .unwrap_or_default();
        *self.pinned.write().expect("lock poisoned") = pinned.clone();
        let have: BTreeSet<ModelVersion> = self
            .versions
            .read()
            .expect("lock poisoned")
            .keys()
            .copied()
            .collect();
        let mut want = BTreeSet::new();
        let mut added = Vec::new();
        // Newest first until `keep` versions are (or become) loaded.
        for &v in listed.iter().rev() {
            if want.len() >= self.cfg.keep {
                break;
            }
            if have.contains(&v) || self.try_load(v, &mut added).await? {
                want.insert(v);
            }
        }
        for &v in pinned.iter().filter(|v| listed.contains(v)) {
            if have.contains(&v) || want.contains(&v) || self.try_load(v, &mut added).await? {
                want.insert(v);
            }
        }
        let mut evicted = Vec::new();
        {
            let mut versions = self.versions.write().expect("lock poisoned");
            for v in have.difference(&want) {
                versions.remove(v);
                evicted.push(*v);
            }
        }
        for v in &evicted {
            tracing::info!(version = %v, "model version evicted");
        }
        let loaded = self
            .loaded()
            .iter()
            .map(|(v, _)| (vec![("version", v.to_string())], 1.0))
            .collect();
        self.metrics.replace(&m::UT_VERSIONS_LOADED, loaded);
        Ok((added, evicted))
    }

    /// Loads and verifies version `v` unless it failed recently. Whether it is loaded now.
    async fn try_load(
        &self,
        v: ModelVersion,
        added: &mut Vec<ModelVersion>,
    ) -> Result<bool, UserTowerError> {
        {
            let mut failed = self.failed.lock().expect("lock poisoned");
            if let Some(wait) = failed.get_mut(&v) {
                // Retry a broken version every 16 polls (it may have been repaired in place).
                *wait += 1;
                if *wait % 16 != 0 {
                    return Ok(false);
                }
            }
        }
        let dir = tandem_artifact::version_dir(&self.cfg.artifacts, MODELS, &self.cfg.model, v);
        let (model, want) = (self.cfg.model.clone(), v);
        let loaded = tokio::task::spawn_blocking(move || -> Result<Loaded, String> {
            let manifest = tandem_model::model::open(&dir).map_err(|e| e.to_string())?;
            if manifest.name != model || manifest.version != want {
                return Err(format!(
                    "the manifest is {} {}, not {model} {want}",
                    manifest.name, manifest.version
                ));
            }
            let model = UserModel::load(&dir).map_err(|e| e.to_string())?;
            Ok(Loaded {
                dim: manifest.meta.dim,
                feature_schema_hash: manifest.meta.feature_schema_hash,
                model,
                loaded_at_ms: now_unix_ms(),
            })
        })
        .await
        .map_err(|e| UserTowerError::Internal(e.to_string()))?;
        match loaded {
            Ok(l) => {
                self.failed.lock().expect("lock poisoned").remove(&v);
                self.versions
                    .write()
                    .expect("lock poisoned")
                    .insert(v, Arc::new(l));
                tracing::info!(version = %v, "model version loaded");
                added.push(v);
                Ok(true)
            }
            Err(e) => {
                let first = self
                    .failed
                    .lock()
                    .expect("lock poisoned")
                    .insert(v, 0)
                    .is_none();
                if first {
                    tracing::error!(version = %v, error = %e, "cannot load model version; it is skipped and retried later");
                    self.metrics
                        .inc(&m::UT_LOAD_FAILURES, &[("version", &v.to_string())]);
                }
                Ok(false)
            }
        }
    }

    pub async fn embed(&self, req: EmbedInput) -> Result<Embedding, UserTowerError> {
        if req.user_id.is_empty() {
            return Err(UserTowerError::InvalidArgument("user_id is empty".into()));
        }
        check_embed_bounds(&req)?;
        if !req.model_name.is_empty() && req.model_name != self.cfg.model {
            return Err(UserTowerError::InvalidArgument(format!(
                "this service serves model {:?}, not {:?}",
                self.cfg.model, req.model_name
            )));
        }
        if let Some(p) = self
            .replication
            .problem
            .lock()
            .expect("lock poisoned")
            .clone()
        {
            // Stale or half-rebuilt state would be served silently: let another replica answer.
            return Err(UserTowerError::NotReady(p));
        }
        if let Some(seq) = req.min_sequence.filter(|&s| s > self.applied()) {
            self.wait_applied(seq).await?;
        }
        let version = req.model_version;
        let loaded = self
            .versions
            .read()
            .expect("lock poisoned")
            .get(&version)
            .cloned();
        let Some(loaded) = loaded else {
            self.metrics.inc(&m::UT_VERSION_REFUSALS, &[]);
            let list: Vec<String> = self.loaded().iter().map(|(v, _)| v.to_string()).collect();
            return Err(UserTowerError::VersionNotLoaded {
                model: self.cfg.model.clone(),
                requested: version,
                loaded: if list.is_empty() {
                    "none".into()
                } else {
                    list.join(", ")
                },
            });
        };
        // The stored history carries event times (the transformer encoder reads the gaps);
        // items given in the request do not.
        let (history, times): (Vec<String>, Vec<i64>) = if req.recent_items.is_empty() {
            self.store
                .read()
                .expect("lock poisoned")
                .history(&req.user_id)
                .into_iter()
                .map(|(i, t)| (i.to_string(), t))
                .unzip()
        } else {
            (req.recent_items, Vec::new())
        };
        let ts = req.request_time.unwrap_or_else(now_unix);
        let model = &loaded.model;
        let (ids, id_times): (Vec<u32>, Vec<i64>) = history
            .iter()
            .enumerate()
            .map(|(k, i)| (model.item_id(i), times.get(k).copied()))
            .filter(|&(i, _)| i != 0)
            .map(|(i, t)| (i, t.unwrap_or_default()))
            .unzip();
        let used = ids.len().min(model.cfg.history);
        let job = Job {
            loaded,
            user: req.user_id,
            history: ids,
            history_ts: if times.is_empty() {
                Vec::new()
            } else {
                id_times
            },
            ts,
            features: req.features,
        };
        let vector = match self.batcher() {
            Some(b) => b.embed(job).await.map_err(UserTowerError::Internal)?,
            None => embed_jobs(vec![job])
                .await
                .map_err(UserTowerError::Internal)?,
        };
        self.metrics
            .inc(&m::UT_EMBEDDINGS, &[("version", &version.to_string())]);
        Ok(Embedding {
            vector,
            history,
            version,
            history_length: used,
        })
    }

    /// The micro-batcher, started on first use when batching is configured.
    fn batcher(&self) -> Option<&Batcher> {
        if !self.cfg.embed_batching.enabled() {
            return None;
        }
        Some(
            self.batcher
                .get_or_init(|| Batcher::start(self.cfg.embed_batching, self.metrics.clone())),
        )
    }

    /// Validates, makes durable, then applies to the online state. Invalid events are counted
    /// and described, never logged. Embedded mode appends to the local log (on the blocking
    /// pool); replicated mode publishes to the stream, answers once JetStream acknowledged, and
    /// first waits (briefly) until this replica applied the message, so the caller reads its
    /// own writes here; any replica does with the returned sequence as `min_sequence`.
    pub async fn record(
        self: &Arc<Self>,
        events: Vec<Event>,
    ) -> Result<RecordOutcome, UserTowerError> {
        let (ok, rejected, errors) = self.validate(events);
        let accepted = ok.len() as u64;
        let sequence = match &self.sink {
            Sink::Local(_) => {
                let me = self.clone();
                tokio::task::spawn_blocking(move || me.commit_local(&ok))
                    .await
                    .map_err(|e| UserTowerError::Internal(e.to_string()))??
            }
            Sink::Nats(stream) => {
                let seq = stream
                    .publish(&ok)
                    .await
                    .map_err(|e| UserTowerError::Log(e.to_string()))?;
                if seq > 0 {
                    // Durable already; not having applied it yet is no failure.
                    let _ = self.wait_applied(seq).await;
                }
                seq.max(self.applied())
            }
        };
        self.metrics
            .add(&m::UT_EVENTS, &[("result", "accepted")], accepted as f64);
        self.metrics
            .add(&m::UT_EVENTS, &[("result", "rejected")], rejected as f64);
        Ok(RecordOutcome {
            accepted,
            rejected,
            errors,
            sequence,
        })
    }

    /// Local mode: log first (an event is in memory only once it is durable, so a restart
    /// replays exactly what was served), then apply. Returns the new sequence.
    fn commit_local(&self, ok: &[Event]) -> Result<u64, UserTowerError> {
        let Sink::Local(log) = &self.sink else {
            return Err(UserTowerError::Internal("not in local-log mode".into()));
        };
        let mut log = log.lock().expect("lock poisoned");
        log.append(ok).map_err(UserTowerError::Log)?;
        self.store.write().expect("lock poisoned").record_all(ok);
        // Under the log lock: sequences advance in log order.
        let seq = self.applied() + ok.len() as u64;
        self.set_applied(seq);
        Ok(seq)
    }

    /// Splits events into the valid ones (defaults filled in) and the count and first reasons
    /// of the rejected ones.
    fn validate(&self, events: Vec<Event>) -> (Vec<Event>, u64, Vec<String>) {
        let now = now_unix();
        let future = now + self.cfg.max_future_skew.as_secs() as i64;
        let oldest = now - self.cfg.max_event_age.as_secs() as i64;
        let mut ok = Vec::with_capacity(events.len());
        let mut errors = Vec::new();
        let mut rejected = 0u64;
        for mut e in events {
            if e.ts == 0 {
                e.ts = now;
            }
            if e.weight == 0.0 {
                e.weight = 1.0;
            }
            let why = if e.user.is_empty() || e.item.is_empty() {
                Some("empty user_id or item_id".to_string())
            } else if e.user.len() > MAX_ID || e.item.len() > MAX_ID || e.action.len() > MAX_ID {
                Some(format!(
                    "user_id, item_id and action may be at most {MAX_ID} bytes"
                ))
            } else if e
                .user
                .chars()
                .chain(e.item.chars())
                .chain(e.action.chars())
                .any(char::is_control)
            {
                Some("ids and action may not contain control characters".to_string())
            } else if e.ts > future {
                Some(format!(
                    "timestamp {} is in the future (now {now}, allowed skew {}s)",
                    e.ts,
                    self.cfg.max_future_skew.as_secs()
                ))
            } else if e.ts < oldest {
                Some(format!(
                    "timestamp {} is older than the {}-day limit",
                    e.ts,
                    self.cfg.max_event_age.as_secs() / 86_400
                ))
            } else if !e.weight.is_finite() {
                Some("weight is not finite".to_string())
            } else {
                None
            };
            match why {
                Some(w) => {
                    rejected += 1;
                    if errors.len() < 10 {
                        let cut = |s: &str| s.chars().take(64).collect::<String>();
                        errors.push(format!("{}/{}: {w}", cut(&e.user), cut(&e.item)));
                    }
                }
                None => ok.push(e),
            }
        }
        (ok, rejected, errors)
    }

    pub fn online_users(&self) -> usize {
        self.store.read().expect("lock poisoned").users()
    }
}
