//! The tonic adapter: converts types and errors, nothing else.

use std::sync::Arc;

use tandem_proto::ann::v1 as pb;
use tandem_proto::ann::v1::ann_search_server::AnnSearch;
use tandem_server::admin::{audit, peer};
use tandem_server::Health;
use tandem_types::ModelVersion;
use tonic::{Request, Response, Status};
use tracing::{field, Instrument};

use crate::host::{AnnError, AnnHost, Metadata, SearchRequest};

impl From<AnnError> for Status {
    fn from(e: AnnError) -> Status {
        let msg = e.to_string();
        match e {
            AnnError::NotLoaded => Status::unavailable(msg),
            AnnError::VersionMismatch { .. } => Status::failed_precondition(msg),
            AnnError::InvalidArgument(_) => Status::invalid_argument(msg),
            AnnError::AdminDisabled => Status::permission_denied(msg),
            AnnError::LoadFailed { .. } => Status::failed_precondition(msg),
            AnnError::NoPrevious => Status::failed_precondition(msg),
            AnnError::NothingPublished { .. } => Status::not_found(msg),
            AnnError::Internal(_) => Status::internal(msg),
        }
    }
}

fn to_pb(m: Metadata) -> pb::VersionMetadata {
    pb::VersionMetadata {
        versions: m
            .versions
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect(),
        index_id: m.index_id,
        item_count: m.item_count,
        dim: m.dim,
        loaded_at_unix_ms: m.loaded_at_ms,
        model_name: m.model_name,
        model_version: m.model_version.to_string(),
        ann_recall_at_10: m.ann_recall_at_10,
        shard: m.shard,
        shard_count: m.shard_count,
        previous_version: m
            .previous_version
            .map(|v| v.to_string())
            .unwrap_or_default(),
    }
}

#[derive(Clone)]
pub struct AnnGrpc {
    host: Arc<AnnHost>,
    health: Health,
}

/// Longest model name a request may carry.
const MAX_NAME: usize = 256;

/// Audits an admin swap: who, what, and what the host serves after it.
fn audit_swap(peer: &str, action: &str, result: &Result<pb::LoadVersionResponse, Status>) {
    let outcome = result.as_ref().map(|r| {
        let m = r.metadata.clone().unwrap_or_default();
        format!("serving {} (was {:?})", m.model_version, r.previous_version)
    });
    audit(peer, action, &outcome.map_err(Clone::clone));
}

/// Parses a version field of a request: INVALID_ARGUMENT naming the field when malformed.
fn version(field: &str, s: &str) -> Result<ModelVersion, Status> {
    if s.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{field} is required: state the version the embedding came from"
        )));
    }
    s.parse().map_err(|e: tandem_types::ParseVersionError| {
        Status::invalid_argument(format!("{field}: {e}"))
    })
}

impl AnnGrpc {
    pub fn new(host: Arc<AnnHost>, health: Health) -> Self {
        AnnGrpc { host, health }
    }

    pub async fn load_initial(&self) -> Result<(), AnnError> {
        let v = self.host.load_initial().await?;
        tracing::info!(version = %v, model = %self.host.config().model, "index loaded");
        self.health.set_serving();
        Ok(())
    }

    /// Admin RPCs need the admin token (refused outright when the host has none).
    fn admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match &self.host.config().admin_token {
            None => Err(AnnError::AdminDisabled.into()),
            Some(t) => t.check(req),
        }
    }

    /// `allow_version_mismatch` is the naive mode's measurement: honoured only when the host
    /// was started to allow it, or from an admin caller.
    fn may_mismatch<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if self.host.config().allow_version_mismatch || self.admin(req).is_ok() {
            return Ok(());
        }
        Err(Status::permission_denied(
            "allow_version_mismatch is for measurement only: start the host with --allow-version-mismatch, or call as admin",
        ))
    }
}

#[tonic::async_trait]
impl AnnSearch for AnnGrpc {
    async fn get_version_metadata(
        &self,
        _req: Request<pb::GetVersionMetadataRequest>,
    ) -> Result<Response<pb::VersionMetadata>, Status> {
        Ok(Response::new(to_pb(self.host.metadata()?)))
    }

    async fn search(
        &self,
        req: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        if req.get_ref().allow_version_mismatch {
            self.may_mismatch(&req)?;
        }
        let r = req.into_inner();
        if r.model_name.len() > MAX_NAME {
            return Err(Status::invalid_argument(format!(
                "model_name is longer than {MAX_NAME} bytes"
            )));
        }
        let model_version = version("model_version", &r.model_version)?;
        let span = tracing::info_span!(
            "ann.search",
            tandem.model_version = %r.model_version,
            tandem.k = r.k,
            tandem.served_version = field::Empty,
            tandem.results = field::Empty,
        );
        let res = self
            .host
            .search(SearchRequest {
                model_name: r.model_name,
                model_version,
                embedding: r.embedding,
                k: r.k,
                ef: r.ef,
                allow_version_mismatch: r.allow_version_mismatch,
                exclude_item_ids: r.exclude_item_ids,
            })
            .instrument(span.clone())
            .await?;
        span.record("tandem.served_version", res.model_version.to_string());
        span.record("tandem.results", res.items.len());
        Ok(Response::new(pb::SearchResponse {
            items: res
                .items
                .into_iter()
                .map(|(item_id, score)| pb::ScoredItem { item_id, score })
                .collect(),
            model_name: res.model_name,
            model_version: res.model_version.to_string(),
            index_id: res.index_id,
        }))
    }

    async fn load_version(
        &self,
        req: Request<pb::LoadVersionRequest>,
    ) -> Result<Response<pb::LoadVersionResponse>, Status> {
        let peer = peer(&req);
        let action = format!("LoadVersion {:?}", req.get_ref().version);
        let result = async {
            self.admin(&req)?;
            let version = version("version", &req.into_inner().version)?;
            let previous = self.host.load(version).await?;
            self.health.set_serving();
            Ok(pb::LoadVersionResponse {
                metadata: Some(to_pb(self.host.metadata()?)),
                previous_version: previous.map(|v| v.to_string()).unwrap_or_default(),
            })
        }
        .await;
        audit_swap(&peer, &action, &result);
        result.map(Response::new)
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::LoadVersionResponse>, Status> {
        let peer = peer(&req);
        let result = async {
            self.admin(&req)?;
            let (_, replaced) = self.host.rollback().await?;
            self.health.set_serving();
            Ok(pb::LoadVersionResponse {
                metadata: Some(to_pb(self.host.metadata()?)),
                previous_version: replaced.map(|v| v.to_string()).unwrap_or_default(),
            })
        }
        .await;
        audit_swap(&peer, "Rollback", &result);
        result.map(Response::new)
    }
}
