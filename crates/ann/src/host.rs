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
use std::time::{SystemTime, UNIX_EPOCH};

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
    /// Version to load at start; the newest when `None`.
    pub version: Option<ModelVersion>,
    /// Token for LoadVersion/Rollback; admin RPCs are refused when `None`.
    pub admin_token: Option<String>,
    /// Largest `k` a search may ask for.
    pub max_k: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum AnnError {
    #[error("no index loaded yet")]
    NotLoaded,
    #[error("this host serves {serving_model} {serving}, but the request was embedded with {requested_model} {requested}")]
    VersionMismatch {
        requested_model: String,
        requested: String,
        serving_model: String,
        serving: ModelVersion,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("admin RPCs are disabled: start the host with --admin-token")]
    AdminDisabled,
    #[error("missing or wrong admin token")]
    BadToken,
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
    pub versions: BTreeMap<String, String>,
    pub index_id: String,
    pub item_count: u64,
    pub dim: u32,
    pub loaded_at_ms: i64,
    pub model_name: String,
    pub model_version: ModelVersion,
    pub ann_recall_at_10: f64,
    pub previous_version: Option<ModelVersion>,
}

pub struct SearchRequest {
    pub model_name: String,
    pub model_version: String,
    pub embedding: Vec<f32>,
    pub k: i32,
    pub ef: Option<u32>,
    /// Measurement only: answer from the loaded version even if the request states another.
    pub allow_version_mismatch: bool,
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

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
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

    pub fn check_admin(&self, token: Option<&str>) -> Result<(), AnnError> {
        match &self.cfg.admin_token {
            None => Err(AnnError::AdminDisabled),
            Some(want) if token == Some(want.as_str()) => Ok(()),
            Some(_) => Err(AnnError::BadToken),
        }
    }

    /// Loads the configured (or newest published) version.
    pub async fn load_initial(&self) -> Result<ModelVersion, AnnError> {
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
        Ok(previous)
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
        let loaded = tokio::task::spawn_blocking(move || {
            let loaded = tandem_index::artifact::load(&dir)?;
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
            loaded_at_ms: now_ms(),
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
            versions: m
                .versions
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
            index_id: m.index_id.clone(),
            item_count: m.item_count,
            dim: m.dim as u32,
            loaded_at_ms: s.loaded_at_ms,
            model_name: m.model_name.clone(),
            model_version: s.version,
            ann_recall_at_10: m.ann_recall_at_10,
            previous_version: self.history.lock().expect("lock poisoned").last().copied(),
        })
    }

    pub async fn search(&self, req: SearchRequest) -> Result<SearchResult, AnnError> {
        let serving = self.serving().ok_or(AnnError::NotLoaded)?;
        let meta = &serving.index.manifest.meta;
        let requested: Option<ModelVersion> = req.model_version.parse().ok();
        if req.model_version.is_empty() {
            return Err(AnnError::InvalidArgument(
                "model_version is required: state the version the embedding came from".into(),
            ));
        }
        let mismatch = (!req.model_name.is_empty() && req.model_name != meta.model_name)
            || requested != Some(serving.version);
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
        let k = req.k as usize;
        let ef = req
            .ef
            .map(|e| e as usize)
            .unwrap_or_else(|| serving.index.index.default_ef());
        let s = serving.clone();
        // Graph search is CPU work: keep it off the async workers.
        let hits = tokio::task::spawn_blocking(move || s.index.index.search(&req.embedding, k, ef))
            .await
            .map_err(|e| AnnError::Internal(e.to_string()))?;
        Ok(SearchResult {
            items: hits
                .into_iter()
                .map(|(row, score)| (serving.index.items[row as usize].clone(), score))
                .collect(),
            model_name: meta.model_name.clone(),
            model_version: serving.version,
            index_id: meta.index_id.clone(),
        })
    }
}
