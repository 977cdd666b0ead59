//! The ANN host's domain logic, free of gRPC.
//!
//! The served index sits behind an `RwLock<Option<Arc<Serving>>>`. A search clones the `Arc`
//! under a momentary read lock and then searches with no lock held, so a swap never waits for
//! searches and never interrupts one: searches that started on the old index finish on it, and
//! the old index is freed when the last of them drops its `Arc`. Loading (reading and verifying
//! the artifact, deserialising the graph) happens entirely before the swap, off the async
//! runtime; if it fails, nothing changes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tandem_index::artifact::{index_dir, LoadedIndex};
use tandem_index::IndexError;
use tandem_telemetry::{catalogue as m, Registry};
use tandem_types::ModelVersion;

#[derive(Debug, Clone)]
pub struct AnnConfig {
    /// Artifact store root (shared by every host).
    pub artifacts: PathBuf,
    /// The model whose index this host serves.
    pub model: String,
    /// Version to load at start; when `None`, the version this host last served (from its
    /// state file), else the newest.
    pub version: Option<ModelVersion>,
    /// Token for LoadVersion/Rollback; admin RPCs are refused when `None`.
    pub admin_token: Option<tandem_server::AdminToken>,
    /// Largest `k` a search may ask for.
    pub max_k: usize,
    /// Largest `ef` a search may ask for.
    pub max_ef: usize,
    /// Honour `allow_version_mismatch` (the naive mode's measurement) from any caller; without
    /// it only an admin caller may set it.
    pub allow_version_mismatch: bool,
    /// This host's name in the registry's pins (it pins what it serves and its rollback target,
    /// so retention and the user tower keep them) and in its state file's name.
    pub host_id: String,
    /// Where the host records what it serves, so a restart resumes it (with its rollback
    /// target); none: `<artifacts>/hosts/<model>-<host_id>.json`.
    pub state_file: Option<PathBuf>,
    /// The shard this host serves of sharded versions; `None` serves unsharded versions only
    /// (a sharded version is refused, as is an unsharded one by a shard host other than 0).
    pub shard: Option<u32>,
}

impl AnnConfig {
    pub fn new(artifacts: PathBuf, model: &str) -> Self {
        AnnConfig {
            artifacts,
            model: model.to_string(),
            version: None,
            admin_token: None,
            max_k: 1000,
            max_ef: 4096,
            allow_version_mismatch: false,
            host_id: "ann".into(),
            state_file: None,
            shard: None,
        }
    }

    fn state_path(&self) -> PathBuf {
        self.state_file.clone().unwrap_or_else(|| {
            self.artifacts
                .join("hosts")
                .join(format!("{}-{}.json", self.model, self.host_id))
        })
    }
}

/// What a host records after every swap.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HostState {
    pub model: String,
    pub serving: ModelVersion,
    /// Versions served before, most recent last (the rollback stack).
    pub history: Vec<ModelVersion>,
}

#[derive(Debug, thiserror::Error)]
pub enum AnnError {
    #[error("no index loaded yet")]
    NotLoaded,
    #[error("this host serves {serving_model} {serving}, but the request was embedded with {requested_model} {requested}")]
    VersionMismatch {
        requested_model: String,
        requested: ModelVersion,
        serving_model: String,
        serving: ModelVersion,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("admin RPCs are disabled: start the host with --admin-token or --admin-token-file")]
    AdminDisabled,
    #[error("loading {model} {version} failed, still serving {current}: {source}")]
    LoadFailed {
        model: String,
        version: ModelVersion,
        current: String,
        #[source]
        source: Box<IndexError>,
    },
    #[error("no previous version to roll back to")]
    NoPrevious,
    #[error("{model}: no index version published under {path}")]
    NothingPublished { model: String, path: PathBuf },
    #[error("search task failed: {0}")]
    Internal(String),
}

/// One loaded version and when it started serving.
pub struct Serving {
    pub index: LoadedIndex,
    pub version: ModelVersion,
    pub loaded_at_ms: i64,
}

/// What `GetVersionMetadata` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    pub versions: BTreeMap<String, ModelVersion>,
    pub index_id: String,
    pub item_count: u64,
    pub dim: u32,
    pub loaded_at_ms: i64,
    pub model_name: String,
    pub model_version: ModelVersion,
    pub ann_recall_at_10: f64,
    pub previous_version: Option<ModelVersion>,
    /// The shard served (0 unsharded) and the version's shard count (1 unsharded).
    pub shard: u32,
    pub shard_count: u32,
}

/// Searches whose `max(ef, k)` is at most this run on the async worker (see
/// [`tandem_server::run_cpu`]).
const INLINE_SEARCH_EF: usize = 512;

/// The most ids one search may exclude (a long engagement history).
pub const MAX_EXCLUDE: usize = 10_000;

pub struct SearchRequest {
    /// Empty: this host's model.
    pub model_name: String,
    /// The version the embedding came from (parsed by the adapter).
    pub model_version: ModelVersion,
    pub embedding: Vec<f32>,
    pub k: i32,
    pub ef: Option<u32>,
    /// Measurement only: answer from the loaded version even if the request states another.
    pub allow_version_mismatch: bool,
    /// Items left out of the answer, skipped inside the graph walk (ids this host does not
    /// hold are ignored: they may live on another shard).
    pub exclude_item_ids: Vec<String>,
}

pub struct SearchResult {
    pub items: Vec<(String, f32)>,
    pub model_name: String,
    pub model_version: ModelVersion,
    pub index_id: String,
}

pub struct AnnHost {
    cfg: AnnConfig,
    current: RwLock<Option<Arc<Serving>>>,
    /// Versions served before the current one, most recent last (for Rollback).
    history: std::sync::Mutex<Vec<ModelVersion>>,
    /// Serialises loads so two LoadVersion calls cannot interleave their swaps.
    loading: tokio::sync::Mutex<()>,
    metrics: Arc<Registry>,
}

impl AnnHost {
    pub fn new(cfg: AnnConfig) -> Self {
        let metrics = Registry::new();
        metrics.register(&[m::ANN_SWAPS, m::ANN_SWAP_DURATION, m::ANN_VERSION_REFUSALS]);
        metrics.set(&m::ANN_SERVING_VERSION, &[("model", &cfg.model)], 0.0);
        AnnHost {
            cfg,
            current: RwLock::new(None),
            history: std::sync::Mutex::new(Vec::new()),
            loading: tokio::sync::Mutex::new(()),
            metrics,
        }
    }

    /// This host's metrics (the `/metrics` endpoint renders them).
    pub fn metrics(&self) -> &Arc<Registry> {
        &self.metrics
    }

    pub fn config(&self) -> &AnnConfig {
        &self.cfg
    }

    /// The version being served right now.
    pub fn serving(&self) -> Option<Arc<Serving>> {
        self.current.read().expect("lock poisoned").clone()
    }

    /// The version to start on: the configured one; else the one this host last served (its
    /// rollback stack restored with it); else the newest published.
    pub async fn load_initial(&self) -> Result<ModelVersion, AnnError> {
        if self.cfg.version.is_none() {
            if let Some(state) = self.read_state() {
                // The rollback stack goes back first, so no metadata answer shows the resumed
                // version without it.
                *self.history.lock().expect("lock poisoned") = state.history;
                match self.load(state.serving).await {
                    Ok(_) => {
                        self.persist();
                        tracing::info!(version = %state.serving, "resumed the version this host served before the restart");
                        return Ok(state.serving);
                    }
                    Err(e) => {
                        self.history.lock().expect("lock poisoned").clear();
                        tracing::error!(error = %e, version = %state.serving, "cannot resume the version served before the restart; loading the newest")
                    }
                }
            }
        }
        let version = match self.cfg.version {
            Some(v) => v,
            None => tandem_artifact::newest_version(
                &self.cfg.artifacts,
                tandem_index::artifact::INDEXES,
                &self.cfg.model,
            )
            .map_err(|_| AnnError::NothingPublished {
                model: self.cfg.model.clone(),
                path: tandem_artifact::series_dir(
                    &self.cfg.artifacts,
                    tandem_index::artifact::INDEXES,
                    &self.cfg.model,
                ),
            })?,
        };
        self.load(version).await.map(|_| version)
    }

    /// Loads `version` fully, then swaps it in. Returns the version it replaced.
    pub async fn load(&self, version: ModelVersion) -> Result<Option<ModelVersion>, AnnError> {
        let _guard = self.loading.lock().await;
        let previous = self.serving().map(|s| s.version);
        if previous == Some(version) {
            return Ok(previous);
        }
        self.timed_swap("load", version).await?;
        if let Some(p) = previous {
            self.history.lock().expect("lock poisoned").push(p);
        }
        self.persist();
        Ok(previous)
    }

    fn read_state(&self) -> Option<HostState> {
        let path = self.cfg.state_path();
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice::<HostState>(&bytes) {
            Ok(s) if s.model == self.cfg.model => Some(s),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable host state file");
                None
            }
        }
    }

    /// Records what this host serves (state file, atomically) and pins it and its rollback
    /// target in the registry. Best effort: a read-only store is logged, not fatal.
    fn persist(&self) {
        let Some(serving) = self.serving().map(|s| s.version) else {
            return;
        };
        let history = self.history.lock().expect("lock poisoned").clone();
        let state = HostState {
            model: self.cfg.model.clone(),
            serving,
            history: history.clone(),
        };
        let path = self.cfg.state_path();
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                tandem_artifact::write_atomic(
                    &path,
                    &serde_json::to_vec_pretty(&state).unwrap_or_default(),
                )
                .map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot record the host state; a restart will load the newest version");
        }
        let keep: Vec<ModelVersion> = [Some(serving), history.last().copied()]
            .into_iter()
            .flatten()
            .collect();
        let holder = format!("ann-host-{}", self.cfg.host_id);
        let pins = tandem_registry::LocalFs::new(&self.cfg.artifacts);
        let result = (|| -> Result<(), tandem_registry::RegistryError> {
            use tandem_registry::Storage;
            for v in &keep {
                pins.pin(tandem_types::MODELS, &self.cfg.model, *v, &holder)?;
            }
            for v in pins.pinned(tandem_types::MODELS, &self.cfg.model)? {
                if !keep.contains(&v) {
                    pins.unpin(tandem_types::MODELS, &self.cfg.model, v, &holder)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot pin the served versions");
        }
    }

    /// Goes back to the version served before the current one.
    pub async fn rollback(&self) -> Result<(ModelVersion, Option<ModelVersion>), AnnError> {
        let _guard = self.loading.lock().await;
        let target = self
            .history
            .lock()
            .expect("lock poisoned")
            .last()
            .copied()
            .ok_or(AnnError::NoPrevious)?;
        let replaced = self.serving().map(|s| s.version);
        self.timed_swap("rollback", target).await?;
        self.history.lock().expect("lock poisoned").pop();
        self.persist();
        Ok((target, replaced))
    }

    /// [`Self::swap_in`], counted and timed by kind and result.
    async fn timed_swap(&self, kind: &'static str, version: ModelVersion) -> Result<(), AnnError> {
        let start = std::time::Instant::now();
        let out = self.swap_in(version).await;
        let result = if out.is_ok() { "ok" } else { "error" };
        let labels = [("kind", kind), ("result", result)];
        self.metrics.inc(&m::ANN_SWAPS, &labels);
        self.metrics.observe(
            &m::ANN_SWAP_DURATION,
            &labels,
            start.elapsed().as_secs_f64(),
        );
        if let Some(s) = self.serving() {
            let model = [("model", self.cfg.model.as_str())];
            self.metrics
                .set(&m::ANN_SERVING_VERSION, &model, s.version.0 as f64);
            self.metrics
                .set(&m::ANN_INDEX_ITEMS, &model, s.index.items.len() as f64);
        }
        out
    }

    async fn swap_in(&self, version: ModelVersion) -> Result<(), AnnError> {
        let dir = index_dir(&self.cfg.artifacts, &self.cfg.model, version);
        let model = self.cfg.model.clone();
        let shard = self.cfg.shard;
        let loaded = tokio::task::spawn_blocking(move || {
            let loaded = tandem_index::artifact::load_shard(&dir, shard)?;
            if loaded.manifest.meta.model_name != model
                || loaded.manifest.meta.model_version != version
            {
                return Err(IndexError::Invalid(format!(
                    "{}: manifest says {} {}",
                    dir.display(),
                    loaded.manifest.meta.model_name,
                    loaded.manifest.meta.model_version
                )));
            }
            Ok(loaded)
        })
        .await
        .map_err(|e| AnnError::Internal(e.to_string()))?;
        let loaded = loaded.map_err(|source| AnnError::LoadFailed {
            model: self.cfg.model.clone(),
            version,
            current: self
                .serving()
                .map_or("nothing".to_string(), |s| s.version.to_string()),
            source: Box::new(source),
        })?;
        let serving = Arc::new(Serving {
            index: loaded,
            version,
            loaded_at_ms: tandem_types::clock::now_unix_ms(),
        });
        // The swap itself: a pointer store under a write lock held for nanoseconds. The old
        // `Arc` is dropped here only if no search still holds it.
        *self.current.write().expect("lock poisoned") = Some(serving);
        Ok(())
    }

    pub fn metadata(&self) -> Result<Metadata, AnnError> {
        let s = self.serving().ok_or(AnnError::NotLoaded)?;
        let m = &s.index.manifest.meta;
        Ok(Metadata {
            versions: m.versions.clone(),
            index_id: m.index_id.clone(),
            item_count: s.index.items.len() as u64,
            dim: m.dim as u32,
            loaded_at_ms: s.loaded_at_ms,
            model_name: m.model_name.clone(),
            model_version: s.version,
            ann_recall_at_10: m.ann_recall_at_10,
            previous_version: self.history.lock().expect("lock poisoned").last().copied(),
            shard: s.index.shard,
            shard_count: m.shard_count(),
        })
    }

    pub async fn search(&self, req: SearchRequest) -> Result<SearchResult, AnnError> {
        let serving = self.serving().ok_or(AnnError::NotLoaded)?;
        let meta = &serving.index.manifest.meta;
        let mismatch = (!req.model_name.is_empty() && req.model_name != meta.model_name)
            || req.model_version != serving.version;
        if mismatch && !req.allow_version_mismatch {
            self.metrics.inc(&m::ANN_VERSION_REFUSALS, &[]);
            return Err(AnnError::VersionMismatch {
                requested_model: if req.model_name.is_empty() {
                    meta.model_name.clone()
                } else {
                    req.model_name
                },
                requested: req.model_version,
                serving_model: meta.model_name.clone(),
                serving: serving.version,
            });
        }
        let dim = serving.index.index.dim();
        if req.embedding.len() != dim {
            return Err(AnnError::InvalidArgument(format!(
                "embedding has dimension {}, the index has {dim}",
                req.embedding.len()
            )));
        }
        if let Some(i) = req.embedding.iter().position(|x| !x.is_finite()) {
            return Err(AnnError::InvalidArgument(format!(
                "embedding[{i}] is not finite"
            )));
        }
        if req.k <= 0 || req.k as usize > self.cfg.max_k {
            return Err(AnnError::InvalidArgument(format!(
                "k must be in 1..={}, got {}",
                self.cfg.max_k, req.k
            )));
        }
        if let Some(ef) = req.ef {
            if ef == 0 || ef as usize > self.cfg.max_ef {
                return Err(AnnError::InvalidArgument(format!(
                    "ef must be in 1..={}, got {ef}",
                    self.cfg.max_ef
                )));
            }
        }
        if req.exclude_item_ids.len() > MAX_EXCLUDE {
            return Err(AnnError::InvalidArgument(format!(
                "exclude_item_ids may hold at most {MAX_EXCLUDE} ids, got {}",
                req.exclude_item_ids.len()
            )));
        }
        let k = req.k as usize;
        let ef = req
            .ef
            .map(|e| e as usize)
            .unwrap_or_else(|| serving.index.index.ef_for(k));
        let s = serving.clone();
        // A search at the usual breadth takes tens of microseconds: run it inline. A very broad
        // one goes to the blocking pool so it cannot stall other requests.
        let cheap = ef.max(k) <= INLINE_SEARCH_EF;
        let hits = tandem_server::run_cpu(cheap, move || {
            let index = &s.index;
            if req.exclude_item_ids.is_empty() {
                return index.index.search(&req.embedding, k, ef);
            }
            let mut skip: Vec<u32> = req
                .exclude_item_ids
                .iter()
                .filter_map(|id| index.row_of(id))
                .collect();
            skip.sort_unstable();
            index
                .index
                .search_filtered(&req.embedding, k, ef, &|r| skip.binary_search(&r).is_ok())
        })
        .await
        .map_err(|e| AnnError::Internal(e.to_string()))?;
        Ok(SearchResult {
            // A score is never non-finite on the wire (the loader refuses non-finite vectors;
            // this keeps the promise whatever an engine returns).
            items: hits
                .into_iter()
                .filter(|(_, score)| score.is_finite())
                .filter_map(|(row, score)| {
                    serving
                        .index
                        .items
                        .get(row as usize)
                        .map(|id| (id.to_string(), score))
                })
                .collect(),
            model_name: meta.model_name.clone(),
            model_version: serving.version,
            index_id: meta.index_id.clone(),
        })
    }
}
