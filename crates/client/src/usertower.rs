//! The user-tower client.

use std::collections::HashMap;
use std::time::Duration;

use tandem_proto::usertower::v1 as pb;
use tandem_proto::usertower::v1::user_tower_client::UserTowerClient as Raw;
use tandem_types::ModelVersion;

pub use pb::EngagementEvent;

use crate::{connect, lazy_wire, ClientOptions, Result, Target, Wire};

/// What to embed: a user, with optional overrides of the stored history and features.
#[derive(Debug, Clone, Default)]
pub struct EmbedQuery {
    /// Empty: the service's model (it refuses another one).
    pub model_name: String,
    pub user_id: String,
    /// Recent items, most recent first, replacing the stored history when not empty.
    pub recent_items: Vec<String>,
    pub features: HashMap<String, String>,
    pub request_time_unix: Option<i64>,
    /// Answer only from state that includes this engagement sequence (read-your-writes).
    pub min_sequence: Option<u64>,
}

impl EmbedQuery {
    pub fn user(user_id: impl Into<String>) -> Self {
        EmbedQuery {
            user_id: user_id.into(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone)]
pub struct Embedding {
    pub vector: Vec<f32>,
    pub model_name: String,
    pub version: ModelVersion,
    /// Items the embedding saw (after out-of-vocabulary items were dropped, at most L).
    pub history_length: u32,
    /// The history it was computed from, most recent first.
    pub history: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoadedVersion {
    pub version: ModelVersion,
    pub dim: u32,
    pub loaded_at_unix_ms: i64,
    pub feature_schema_hash: String,
    pub pinned: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recorded {
    pub accepted: u64,
    pub rejected: u64,
    /// Why events were rejected (the first few).
    pub errors: Vec<String>,
    /// The engagement sequence holding the accepted events (see [`EmbedQuery::min_sequence`]).
    pub sequence: u64,
}

impl From<pb::RecordResponse> for Recorded {
    fn from(r: pb::RecordResponse) -> Self {
        Recorded {
            accepted: r.accepted,
            rejected: r.rejected,
            errors: r.errors,
            sequence: r.sequence,
        }
    }
}

#[derive(Clone)]
pub struct UserTowerClient {
    target: Target,
    inner: Raw<Wire>,
}

impl UserTowerClient {
    /// A client that connects on first use.
    pub fn lazy(url: &str, opts: &ClientOptions) -> Result<Self> {
        Self::over(url, lazy_wire(url, opts)?, opts)
    }

    /// A client connected now.
    pub async fn connect(url: &str, opts: &ClientOptions) -> Result<Self> {
        Self::over(url, Wire::Tonic(connect(url, opts).await?), opts)
    }

    fn over(url: &str, ch: Wire, opts: &ClientOptions) -> Result<Self> {
        Ok(UserTowerClient {
            target: Target::new(url, opts)?,
            inner: Raw::new(ch),
        })
    }

    pub fn url(&self) -> &str {
        &self.target.url
    }

    /// The embedding of `q.user_id` by exactly `version` (NOT_FOUND when it is not loaded).
    pub async fn embed(
        &self,
        version: ModelVersion,
        q: EmbedQuery,
        timeout: Option<Duration>,
    ) -> Result<Embedding> {
        let req = self.target.request(
            pb::EmbedRequest {
                model_name: q.model_name,
                model_version: version.to_string(),
                user_id: q.user_id,
                recent_items: q.recent_items,
                features: q.features,
                request_time_unix: q.request_time_unix,
                min_sequence: q.min_sequence,
            },
            timeout,
        );
        let mut c = self.inner.clone();
        let r = self
            .target
            .traced("tandem.usertower.v1.UserTower/Embed", req, |r| async move {
                c.embed(r).await
            })
            .await?;
        let got = self.target.version("model_version", &r.model_version)?;
        if got != version {
            return Err(self
                .target
                .malformed(format!("asked for a {version} embedding, got {got}")));
        }
        Ok(Embedding {
            vector: r.embedding,
            model_name: r.model_name,
            version: got,
            history_length: r.history_length,
            history: r.history,
        })
    }

    /// The versions loaded right now, oldest first.
    pub async fn versions(&self, timeout: Option<Duration>) -> Result<Vec<LoadedVersion>> {
        Ok(self.list_versions(timeout).await?.1)
    }

    /// The service's model name and the versions it has loaded, oldest first.
    pub async fn list_versions(
        &self,
        timeout: Option<Duration>,
    ) -> Result<(String, Vec<LoadedVersion>)> {
        let req = self.target.request(pb::ListVersionsRequest {}, timeout);
        let mut c = self.inner.clone();
        let r = self
            .target
            .traced(
                "tandem.usertower.v1.UserTower/ListVersions",
                req,
                |r| async move { c.list_versions(r).await },
            )
            .await?;
        let mut out = r
            .versions
            .into_iter()
            .map(|v| {
                Ok(LoadedVersion {
                    version: self.target.version("model_version", &v.model_version)?,
                    dim: v.dim,
                    loaded_at_unix_ms: v.loaded_at_unix_ms,
                    feature_schema_hash: v.feature_schema_hash,
                    pinned: v.pinned,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.sort_by_key(|v| v.version);
        Ok((r.model_name, out))
    }

    /// Records one event; a rejected event is an INVALID_ARGUMENT error.
    pub async fn record(&self, e: EngagementEvent, timeout: Option<Duration>) -> Result<Recorded> {
        let req = self.target.request(e, timeout);
        let mut c = self.inner.clone();
        self.target
            .traced(
                "tandem.usertower.v1.UserTower/RecordEngagement",
                req,
                |r| async move { c.record_engagement(r).await },
            )
            .await
            .map(Recorded::from)
    }

    /// Records a batch; invalid events are counted and described, the rest are kept.
    pub async fn record_batch(
        &self,
        events: Vec<EngagementEvent>,
        timeout: Option<Duration>,
    ) -> Result<Recorded> {
        let req = self.target.request(pb::EngagementBatch { events }, timeout);
        let mut c = self.inner.clone();
        self.target
            .traced(
                "tandem.usertower.v1.UserTower/RecordEngagementBatch",
                req,
                |r| async move { c.record_engagement_batch(r).await },
            )
            .await
            .map(Recorded::from)
    }
}
