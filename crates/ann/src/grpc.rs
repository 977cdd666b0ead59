//! The tonic adapter: converts types and errors, nothing else.

use std::sync::Arc;

use tandem_proto::ann::v1 as pb;
use tandem_proto::ann::v1::ann_search_server::{AnnSearch, AnnSearchServer};
use tonic::{Request, Response, Status};
use tonic_health::server::HealthReporter;
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
            AnnError::BadToken => Status::unauthenticated(msg),
            AnnError::LoadFailed { .. } => Status::failed_precondition(msg),
            AnnError::NoPrevious => Status::failed_precondition(msg),
            AnnError::NothingPublished { .. } => Status::not_found(msg),
            AnnError::Internal(_) => Status::internal(msg),
        }
    }
}

fn to_pb(m: Metadata) -> pb::VersionMetadata {
    pb::VersionMetadata {
        versions: m.versions.into_iter().collect(),
        index_id: m.index_id,
        item_count: m.item_count,
        dim: m.dim,
        loaded_at_unix_ms: m.loaded_at_ms,
        model_name: m.model_name,
        model_version: m.model_version.to_string(),
        ann_recall_at_10: m.ann_recall_at_10,
        previous_version: m
            .previous_version
            .map(|v| v.to_string())
            .unwrap_or_default(),
    }
}

#[derive(Clone)]
pub struct AnnGrpc {
    host: Arc<AnnHost>,
    health: HealthReporter,
}

impl AnnGrpc {
    pub fn new(host: Arc<AnnHost>, health: HealthReporter) -> Self {
        AnnGrpc { host, health }
    }

    async fn mark_serving(&self) {
        self.health.set_serving::<AnnSearchServer<AnnGrpc>>().await;
    }

    pub async fn load_initial(&self) -> Result<(), AnnError> {
        let v = self.host.load_initial().await?;
        tracing::info!(version = %v, model = %self.host.config().model, "index loaded");
        self.mark_serving().await;
        Ok(())
    }

    fn admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        Ok(self.host.check_admin(token)?)
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
        let r = req.into_inner();
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
                model_version: r.model_version,
                embedding: r.embedding,
                k: r.k,
                ef: r.ef,
                allow_version_mismatch: r.allow_version_mismatch,
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
        self.admin(&req)?;
        let version =
            req.into_inner()
                .version
                .parse()
                .map_err(|e: tandem_types::ParseVersionError| {
                    Status::invalid_argument(e.to_string())
                })?;
        let previous = self.host.load(version).await?;
        self.mark_serving().await;
        Ok(Response::new(pb::LoadVersionResponse {
            metadata: Some(to_pb(self.host.metadata()?)),
            previous_version: previous.map(|v| v.to_string()).unwrap_or_default(),
        }))
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::LoadVersionResponse>, Status> {
        self.admin(&req)?;
        let (_, replaced) = self.host.rollback().await?;
        self.mark_serving().await;
        Ok(Response::new(pb::LoadVersionResponse {
            metadata: Some(to_pb(self.host.metadata()?)),
            previous_version: replaced.map(|v| v.to_string()).unwrap_or_default(),
        }))
    }
}
