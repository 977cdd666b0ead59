//! The user-tower service's domain logic, free of gRPC: the set of loaded versions (kept in
//! sync with the registry), the online store and the durable log.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tandem_model::{UserModel, UserRequest};
use tandem_registry::{Registry, Storage, MODELS};
use tandem_telemetry::catalogue as m;
use tandem_types::ModelVersion;

use crate::online::{Event, EventLogWriter, Fsync, OnlineStore};

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
    /// Recent items kept per user (≥ every loaded version's L).
    pub history_cap: usize,
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
            history_cap: 50,
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
        requested: String,
        loaded: String,
    },
    #[error("no model version loaded yet")]
    NothingLoaded,
    #[error("event log: {0}")]
    Log(String),
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
    pub model_name: String,
    pub model_version: String,
    pub user_id: String,
    pub recent_items: Vec<String>,
    pub features: HashMap<String, String>,
    pub request_time: Option<i64>,
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
}

pub struct UserTower {
    cfg: UserTowerConfig,
    registry: Registry,
    versions: RwLock<BTreeMap<ModelVersion, Arc<Loaded>>>,
    pinned: RwLock<BTreeSet<ModelVersion>>,
    store: RwLock<OnlineStore>,
    log: Mutex<EventLogWriter>,
    metrics: Arc<tandem_telemetry::Registry>,
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

impl UserTower {
    /// Opens the event log (rebuilding the online state from it); loads no model yet.
    pub fn open(cfg: UserTowerConfig) -> Result<Self, UserTowerError> {
        let (log, events) = EventLogWriter::open(&cfg.event_log, cfg.fsync, cfg.segment_bytes)
            .map_err(UserTowerError::Log)?;
        let mut store = OnlineStore::new(cfg.history_cap);
        for e in &events {
            store.record(&e.user, &e.item, e.ts);
        }
        tracing::info!(
            events = events.len(),
            users = store.users(),
            "online state rebuilt from the event log"
        );
        let metrics = tandem_telemetry::Registry::new();
        metrics.register(&[
            m::UT_VERSIONS_LOADED,
            m::UT_EMBEDDINGS,
            m::UT_VERSION_REFUSALS,
            m::UT_EVENTS,
        ]);
        Ok(UserTower {
            metrics,
            registry: Registry::open(&cfg.artifacts),
            cfg,
            versions: RwLock::new(BTreeMap::new()),
            pinned: RwLock::new(BTreeSet::new()),
            store: RwLock::new(store),
            log: Mutex::new(log),
        })
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

    /// Brings the loaded set in line with the registry: the newest `keep` versions plus every
    /// pinned one are loaded; others are evicted. Returns (loaded, evicted).
    pub async fn refresh(&self) -> Result<(Vec<ModelVersion>, Vec<ModelVersion>), UserTowerError> {
        // One listing per poll: the newest `keep` are its tail.
        let listed = self
            .registry
            .list(MODELS, &self.cfg.model)
            .map_err(|e| UserTowerError::Internal(e.to_string()))?;
        let newest = &listed[listed.len().saturating_sub(self.cfg.keep)..];
        let pinned = self
            .registry
            .storage
            .pinned(MODELS, &self.cfg.model)
            .unwrap_or_default();
        let all: BTreeSet<ModelVersion> = listed.iter().copied().collect();
        let want: BTreeSet<ModelVersion> = newest
            .iter()
            .copied()
            .chain(pinned.iter().copied().filter(|v| all.contains(v)))
            .collect();
        *self.pinned.write().expect("lock poisoned") = pinned;
        let have: BTreeSet<ModelVersion> = self
            .versions
            .read()
            .expect("lock poisoned")
            .keys()
            .copied()
            .collect();
        let mut added = Vec::new();
        for &v in want.difference(&have) {
            let dir = tandem_artifact::version_dir(&self.cfg.artifacts, MODELS, &self.cfg.model, v);
            let loaded = tokio::task::spawn_blocking(move || -> Result<Loaded, String> {
                let manifest = tandem_model::model::open(&dir).map_err(|e| e.to_string())?;
                let model = UserModel::load(&dir).map_err(|e| e.to_string())?;
                Ok(Loaded {
                    dim: manifest.meta.dim,
                    feature_schema_hash: manifest.meta.feature_schema_hash,
                    model,
                    loaded_at_ms: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or_default(),
                })
            })
            .await
            .map_err(|e| UserTowerError::Internal(e.to_string()))?;
            match loaded {
                Ok(l) => {
                    self.versions
                        .write()
                        .expect("lock poisoned")
                        .insert(v, Arc::new(l));
                    tracing::info!(version = %v, "model version loaded");
                    added.push(v);
                }
                // A corrupt or half-copied version is skipped, never served; retried next poll.
                Err(e) => tracing::error!(version = %v, error = %e, "cannot load model version"),
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

    pub async fn embed(&self, req: EmbedInput) -> Result<Embedding, UserTowerError> {
        if req.user_id.is_empty() {
            return Err(UserTowerError::InvalidArgument("user_id is empty".into()));
        }
        if !req.model_name.is_empty() && req.model_name != self.cfg.model {
            return Err(UserTowerError::InvalidArgument(format!(
                "this service serves model {:?}, not {:?}",
                self.cfg.model, req.model_name
            )));
        }
        let version: ModelVersion =
            req.model_version
                .parse()
                .map_err(|e: tandem_types::ParseVersionError| {
                    UserTowerError::InvalidArgument(e.to_string())
                })?;
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
                requested: version.to_string(),
                loaded: if list.is_empty() {
                    "none".into()
                } else {
                    list.join(", ")
                },
            });
        };
        let history: Vec<String> = if req.recent_items.is_empty() {
            self.store
                .read()
                .expect("lock poisoned")
                .history(&req.user_id)
                .into_iter()
                .map(String::from)
                .collect()
        } else {
            req.recent_items
        };
        let ts = req.request_time.unwrap_or_else(now_secs);
        let metrics = self.metrics.clone();
        // Inference runs on the blocking pool: the async workers keep serving other requests.
        tokio::task::spawn_blocking(move || {
            let m = &loaded.model;
            let ids: Vec<u32> = history
                .iter()
                .map(|i| m.item_id(i))
                .filter(|&i| i != 0)
                .collect();
            let used = ids.len().min(m.cfg.history);
            let features = (!req.features.is_empty()).then_some(&req.features);
            let r = UserRequest {
                user: &req.user_id,
                history: ids,
                ts,
                features,
            };
            let v = m
                .embed_requests(&[r])
                .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
                .map_err(|e| UserTowerError::Internal(e.to_string()))?;
            metrics.inc(&m::UT_EMBEDDINGS, &[("version", &version.to_string())]);
            Ok(Embedding {
                vector: v,
                history,
                version,
                history_length: used,
            })
        })
        .await
        .map_err(|e| UserTowerError::Internal(e.to_string()))?
    }

    /// Validates, logs durably, then applies to the online state. Invalid events are counted and
    /// described, never logged.
    pub fn record(&self, events: Vec<Event>) -> Result<RecordOutcome, UserTowerError> {
        let now = now_secs();
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
                        errors.push(format!("{}/{}: {w}", e.user, e.item));
                    }
                }
                None => ok.push(e),
            }
        }
        // Log first: an event is in memory only once it is durable, so a restart replays
        // exactly what was served.
        self.log
            .lock()
            .expect("lock poisoned")
            .append(&ok)
            .map_err(UserTowerError::Log)?;
        let mut store = self.store.write().expect("lock poisoned");
        for e in &ok {
            store.record(&e.user, &e.item, e.ts);
        }
        self.metrics
            .add(&m::UT_EVENTS, &[("result", "accepted")], ok.len() as f64);
        self.metrics
            .add(&m::UT_EVENTS, &[("result", "rejected")], rejected as f64);
        Ok(RecordOutcome {
            accepted: ok.len() as u64,
            rejected,
            errors,
        })
    }

    pub fn online_users(&self) -> usize {
        self.store.read().expect("lock poisoned").users()
    }
}
