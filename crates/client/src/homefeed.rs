//! The homefeed orchestrator client.

use std::time::Duration;

use tandem_proto::homefeed::v1 as pb;
use tandem_proto::homefeed::v1::homefeed_client::HomefeedClient as Raw;
use tandem_types::ModelVersion;

use crate::{connect, lazy_wire, ClientOptions, Result, Target, Wire};

/// A GetCandidates answer with the versions that produced it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub items: Vec<(String, f32)>,
    pub model_name: String,
    /// The index version that answered.
    pub index_version: ModelVersion,
    /// The user-tower version the embedding came from (equal to `index_version` unless the
    /// orchestrator runs in its naive measurement mode).
    pub embedding_version: ModelVersion,
    pub ann_host: String,
    pub attempts: u32,
}

impl Answer {
    /// Embedding and index versions differ (never in sync mode).
    pub fn mismatched(&self) -> bool {
        self.index_version != self.embedding_version
    }
}

#[derive(Clone)]
pub struct HomefeedClient {
    target: Target,
    inner: Raw<Wire>,
}

impl HomefeedClient {
    /// A client that connects on first use.
    pub fn lazy(url: &str, opts: &ClientOptions) -> Result<Self> {
        Self::over(url, lazy_wire(url, opts)?, opts)
    }

    /// A client that connects on first use over tonic's channel even for `http://` (its
    /// request HEADERS and DATA leave in separate writes). `tandem bench homefeed`'s load
    /// generator uses it, so the services' CPU per request compares across versions of the
    /// lean transport without the client changing under them.
    pub fn lazy_channel(url: &str, opts: &ClientOptions) -> Result<Self> {
        Self::over(url, Wire::Tonic(crate::channel(url, opts)?), opts)
    }

    /// A client connected now.
    pub async fn connect(url: &str, opts: &ClientOptions) -> Result<Self> {
        Self::over(url, Wire::Tonic(connect(url, opts).await?), opts)
    }

    fn over(url: &str, ch: Wire, opts: &ClientOptions) -> Result<Self> {
        Ok(HomefeedClient {
            target: Target::new(url, opts)?,
            inner: Raw::new(ch),
        })
    }

    pub fn url(&self) -> &str {
        &self.target.url
    }

    pub async fn candidates(
        &self,
        user_id: &str,
        k: i32,
        exclude_seen: bool,
        timeout: Option<Duration>,
    ) -> Result<Answer> {
        self.candidates_after(user_id, k, exclude_seen, None, timeout)
            .await
    }

    /// [`Self::candidates`] from user state that includes engagement sequence `min_sequence`.
    pub async fn candidates_after(
        &self,
        user_id: &str,
        k: i32,
        exclude_seen: bool,
        min_sequence: Option<u64>,
        timeout: Option<Duration>,
    ) -> Result<Answer> {
        let req = self.target.request(
            pb::GetCandidatesRequest {
                user_id: user_id.to_string(),
                k,
                exclude_seen,
                min_sequence,
            },
            timeout,
        );
        let mut c = self.inner.clone();
        let r = self
            .target
            .traced(
                "tandem.homefeed.v1.Homefeed/GetCandidates",
                req,
                |r| async move { c.get_candidates(r).await },
            )
            .await?;
        Ok(Answer {
            index_version: self.target.version("model_version", &r.model_version)?,
            embedding_version: self
                .target
                .version("embedding_version", &r.embedding_version)?,
            items: r.items.into_iter().map(|i| (i.item_id, i.score)).collect(),
            model_name: r.model_name,
            ann_host: r.ann_host,
            attempts: r.attempts,
        })
    }
}
