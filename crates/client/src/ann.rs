//! The ANN host client.

use std::collections::BTreeMap;
use std::time::Duration;

use tandem_proto::ann::v1 as pb;
use tandem_proto::ann::v1::ann_search_client::AnnSearchClient;
use tandem_types::ModelVersion;

use crate::{connect, lazy_wire, ClientOptions, Result, Target, Wire};

/// What a host reports about the index it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct HostMetadata {
    pub model_name: String,
    pub model_version: ModelVersion,
    /// Model name → version of every model whose embeddings built the index.
    pub versions: BTreeMap<String, ModelVersion>,
    pub index_id: String,
    pub item_count: u64,
    pub dim: u32,
    pub loaded_at_unix_ms: i64,
    pub ann_recall_at_10: f64,
    /// The version Rollback would return to.
    pub previous_version: Option<ModelVersion>,
    /// The shard this host serves (0 unsharded) of `shard_count` (1 unsharded).
    pub shard: u32,
    pub shard_count: u32,
}

impl HostMetadata {
    /// The version of `model` this index was built with (the served version when the map does
    /// not name it).
    pub fn version_of(&self, model: &str) -> ModelVersion {
        self.versions
            .get(model)
            .copied()
            .unwrap_or(self.model_version)
    }
}

/// One search. The embedding must come from `version` of the user tower.
#[derive(Debug, Clone)]
pub struct SearchQuery {
    pub model_name: String,
    pub version: ModelVersion,
    pub embedding: Vec<f32>,
    pub k: i32,
    pub ef: Option<u32>,
    /// Measurement only (the orchestrator's naive mode): answer from whatever is loaded.
    pub allow_version_mismatch: bool,
    /// Items to leave out (skipped inside the host's graph walk; the answer keeps k items).
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct SearchAnswer {
    pub items: Vec<(String, f32)>,
    pub model_name: String,
    /// The version that answered.
    pub version: ModelVersion,
    pub index_id: String,
}

/// The result of LoadVersion or Rollback.
#[derive(Debug, Clone)]
pub struct Swapped {
    pub now: HostMetadata,
    /// What the host served before (none on its first load).
    pub replaced: Option<ModelVersion>,
}

#[derive(Clone)]
pub struct AnnClient {
    target: Target,
    inner: AnnSearchClient<Wire>,
}

impl AnnClient {
    /// A client that connects on first use (a host that is down is retried by the next call).
    pub fn lazy(url: &str, opts: &ClientOptions) -> Result<Self> {
        Self::over(url, lazy_wire(url, opts)?, opts)
    }

    /// A client connected now.
    pub async fn connect(url: &str, opts: &ClientOptions) -> Result<Self> {
        Self::over(url, Wire::Tonic(connect(url, opts).await?), opts)
    }

    fn over(url: &str, ch: Wire, opts: &ClientOptions) -> Result<Self> {
        Ok(AnnClient {
            target: Target::new(url, opts)?,
            inner: AnnSearchClient::new(ch).max_decoding_message_size(64 << 20),
        })
    }

    pub fn url(&self) -> &str {
        &self.target.url
    }

    fn metadata_from(&self, m: pb::VersionMetadata) -> Result<HostMetadata> {
        let t = &self.target;
        let versions = m
            .versions
            .iter()
            .map(|(k, v)| Ok((k.clone(), t.version("versions", v)?)))
            .collect::<Result<_>>()?;
        Ok(HostMetadata {
            model_version: t.version("model_version", &m.model_version)?,
            previous_version: t.optional_version("previous_version", &m.previous_version)?,
            versions,
            model_name: m.model_name,
            index_id: m.index_id,
            item_count: m.item_count,
            shard: m.shard,
            shard_count: m.shard_count.max(1),
            dim: m.dim,
            loaded_at_unix_ms: m.loaded_at_unix_ms,
            ann_recall_at_10: m.ann_recall_at_10,
        })
    }

    pub async fn metadata(&self, timeout: Option<Duration>) -> Result<HostMetadata> {
        let req = self
            .target
            .request(pb::GetVersionMetadataRequest {}, timeout);
        let mut c = self.inner.clone();
        let m = self
            .target
            .traced(
                "tandem.ann.v1.AnnSearch/GetVersionMetadata",
                req,
                |r| async move { c.get_version_metadata(r).await },
            )
            .await?;
        self.metadata_from(m)
    }

    pub async fn search(&self, q: SearchQuery, timeout: Option<Duration>) -> Result<SearchAnswer> {
        let req = self.target.request(
            pb::SearchRequest {
                model_name: q.model_name,
                model_version: q.version.to_string(),
                embedding: q.embedding,
                k: q.k,
                ef: q.ef,
                allow_version_mismatch: q.allow_version_mismatch,
                exclude_item_ids: q.exclude,
            },
            timeout,
        );
        let mut c = self.inner.clone();
        let r = self
            .target
            .traced("tandem.ann.v1.AnnSearch/Search", req, |r| async move {
                c.search(r).await
            })
            .await?;
        Ok(SearchAnswer {
            version: self.target.version("model_version", &r.model_version)?,
            items: r.items.into_iter().map(|i| (i.item_id, i.score)).collect(),
            model_name: r.model_name,
            index_id: r.index_id,
        })
    }

    fn swapped(&self, r: pb::LoadVersionResponse) -> Result<Swapped> {
        let now = r
            .metadata
            .ok_or_else(|| self.target.malformed("no metadata"))?;
        Ok(Swapped {
            now: self.metadata_from(now)?,
            replaced: self
                .target
                .optional_version("previous_version", &r.previous_version)?,
        })
    }

    /// Admin: loads `version` fully, then swaps it in (the call returns after the swap).
    pub async fn load(&self, version: ModelVersion, timeout: Option<Duration>) -> Result<Swapped> {
        let req = self.target.admin_request(
            pb::LoadVersionRequest {
                version: version.to_string(),
            },
            timeout,
        )?;
        let mut c = self.inner.clone();
        let r = self
            .target
            .traced("tandem.ann.v1.AnnSearch/LoadVersion", req, |r| async move {
                c.load_version(r).await
            })
            .await?;
        self.swapped(r)
    }

    /// Admin: back to the version served before the current one.
    pub async fn rollback(&self, timeout: Option<Duration>) -> Result<Swapped> {
        let req = self.target.admin_request(pb::RollbackRequest {}, timeout)?;
        let mut c = self.inner.clone();
        let r = self
            .target
            .traced("tandem.ann.v1.AnnSearch/Rollback", req, |r| async move {
                c.rollback(r).await
            })
            .await?;
        self.swapped(r)
    }
}
