//! Index artifacts: `ARTIFACTS/indexes/<model>/<version>/` holding `index.bin` (the engine's
//! bytes), `items.json` (row → item id) and a manifest whose `versions` map (model name → model
//! version) is generated together with the index. The index version is the model version it was
//! built from, so "index v3" always means "item tower v3".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_artifact::{Manifest, Published};
use tandem_types::ModelVersion;

use crate::{AnnIndex, HnswParams, IndexError, Result};

pub const INDEXES: &str = "indexes";
pub const INDEX_FILE: &str = "index.bin";
pub const ITEMS_FILE: &str = "items.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexManifest {
    /// Model name → model version of every model whose embeddings are in this index.
    pub versions: BTreeMap<String, ModelVersion>,
    /// Unique per build (model, version, content hash prefix).
    pub index_id: String,
    pub model_name: String,
    pub model_version: ModelVersion,
    pub item_count: u64,
    pub dim: usize,
    pub params: HnswParams,
    pub build_seconds: f64,
    /// ANN recall@10 against exact search at the default `ef`.
    pub ann_recall_at_10: f64,
    pub recall_queries: usize,
    /// Where the recall queries came from (user histories from an event log, or profiles).
    pub recall_query_source: String,
    /// The model's feature-schema hash, for operators comparing versions.
    #[serde(default)]
    pub feature_schema_hash: String,
}

pub fn index_dir(root: &Path, model: &str, version: ModelVersion) -> PathBuf {
    tandem_artifact::version_dir(root, INDEXES, model, version)
}

/// Publishes an index as version `meta.model_version` of `indexes/<model_name>`.
pub fn publish(
    root: &Path,
    index: &dyn AnnIndex,
    items: &[String],
    meta: &IndexManifest,
) -> Result<Published> {
    if items.len() != index.len() {
        return Err(IndexError::Invalid(format!(
            "{} item ids for {} vectors",
            items.len(),
            index.len()
        )));
    }
    let bytes = index.to_bytes();
    let items_json = serde_json::to_vec(items).map_err(|e| IndexError::Invalid(e.to_string()))?;
    Ok(tandem_artifact::publish(
        root,
        INDEXES,
        &meta.model_name,
        Some(meta.model_version),
        meta,
        |dir| {
            std::fs::write(dir.join(INDEX_FILE), &bytes).map_err(|e| e.to_string())?;
            std::fs::write(dir.join(ITEMS_FILE), &items_json).map_err(|e| e.to_string())
        },
    )?)
}

/// A loaded, verified index version.
pub struct LoadedIndex {
    pub dir: PathBuf,
    pub manifest: Manifest<IndexManifest>,
    pub index: Box<dyn AnnIndex>,
    pub items: Vec<String>,
}

impl std::fmt::Debug for LoadedIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedIndex")
            .field("dir", &self.dir)
            .field("index_id", &self.manifest.meta.index_id)
            .finish()
    }
}

/// Loads an index version, refusing it if any file fails its checksum.
pub fn load(dir: &Path) -> Result<LoadedIndex> {
    let manifest: Manifest<IndexManifest> = tandem_artifact::open(dir)?;
    let read = |name: &str| -> Result<Vec<u8>> {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| IndexError::Io { path, source })
    };
    let index = crate::load(&read(INDEX_FILE)?, manifest.meta.params.engine)?;
    let items: Vec<String> = serde_json::from_slice(&read(ITEMS_FILE)?)
        .map_err(|e| IndexError::Invalid(format!("{}: {e}", dir.join(ITEMS_FILE).display())))?;
    if items.len() != index.len() || index.dim() != manifest.meta.dim {
        return Err(IndexError::Invalid(format!(
            "{}: index does not match its manifest",
            dir.display()
        )));
    }
    Ok(LoadedIndex {
        dir: dir.to_path_buf(),
        manifest,
        index,
        items,
    })
}
