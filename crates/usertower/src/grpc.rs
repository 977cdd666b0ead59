//! The tonic adapter: converts types and errors, nothing else.

use std::sync::Arc;

use tandem_proto::usertower::v1 as pb;
use tandem_proto::usertower::v1::user_tower_server::UserTower as UserTowerRpc;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::online::Event;
use crate::service::{EmbedInput, UserTower, UserTowerError};

impl From<UserTowerError> for Status {
    fn from(e: UserTowerError) -> Status {
        let msg = e.to_string();
        match e {
            UserTowerError::InvalidArgument(_) => Status::invalid_argument(msg),
            UserTowerError::VersionNotLoaded { .. } => Status::not_found(msg),
            UserTowerError::NothingLoaded => Status::unavailable(msg),
            UserTowerError::Log(_) => Status::unavailable(msg),
            UserTowerError::Behind { .. } | UserTowerError::NotReady(_) => Status::unavailable(msg),
            UserTowerError::Internal(_) => Status::internal(msg),
        }
    }
}

fn event(e: pb::EngagementEvent) -> Event {
    Event {
        user: e.user_id,
        item: e.item_id,
        ts: e.timestamp,
        action: e.action,
        weight: e.weight,
    }
}

#[derive(Clone)]
pub struct UserTowerGrpc {
    core: Arc<UserTower>,
}

impl UserTowerGrpc {
    pub fn new(core: Arc<UserTower>) -> Self {
        UserTowerGrpc { core }
    }

    async fn record(&self, events: Vec<Event>) -> Result<pb::RecordResponse, Status> {
        let out = self.core.record(events).await?;
        Ok(pb::RecordResponse {
            accepted: out.accepted,
            rejected: out.rejected,
            errors: out.errors,
            sequence: out.sequence,
        })
    }
}

#[tonic::async_trait]
impl UserTowerRpc for UserTowerGrpc {
    async fn embed(
        &self,
        req: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let r = req.into_inner();
        let model_version: tandem_types::ModelVersion =
            r.model_version
                .parse()
                .map_err(|e: tandem_types::ParseVersionError| {
                    Status::invalid_argument(format!("model_version: {e}"))
                })?;
        let model_name = self.core.config().model.clone();
        let span = tracing::info_span!(
            "usertower.embed",
            tandem.model_version = %r.model_version,
            tandem.history_length = tracing::field::Empty,
        );
        let out = self
            .core
            .embed(EmbedInput {
                model_name: r.model_name,
                model_version,
                user_id: r.user_id,
                recent_items: r.recent_items,
                features: r.features.into_iter().collect(),
                request_time: r.request_time_unix,
                min_sequence: r.min_sequence,
            })
            .instrument(span.clone())
            .await?;
        span.record("tandem.history_length", out.history_length);
        Ok(Response::new(pb::EmbedResponse {
            embedding: out.vector,
            model_name,
            model_version: out.version.to_string(),
            history_length: out.history_length as u32,
            history: out.history,
        }))
    }

    async fn list_versions(
        &self,
        _req: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        let versions = self
            .core
            .loaded()
            .into_iter()
            .map(|(v, l)| pb::LoadedVersion {
                model_version: v.to_string(),
                dim: l.dim as u32,
                loaded_at_unix_ms: l.loaded_at_ms,
                feature_schema_hash: l.feature_schema_hash.clone(),
                pinned: self.core.is_pinned(v),
            })
            .collect();
        Ok(Response::new(pb::ListVersionsResponse {
            model_name: self.core.config().model.clone(),
            versions,
        }))
    }

    async fn record_engagement(
        &self,
        req: Request<pb::EngagementEvent>,
    ) -> Result<Response<pb::RecordResponse>, Status> {
        let out = self.record(vec![event(req.into_inner())]).await?;
        if out.rejected > 0 {
            return Err(Status::invalid_argument(out.errors.join("; ")));
        }
        Ok(Response::new(out))
    }

    async fn record_engagement_batch(
        &self,
        req: Request<pb::EngagementBatch>,
    ) -> Result<Response<pb::RecordResponse>, Status> {
        let events = req.into_inner().events;
        if events.len() > crate::service::MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "a batch holds at most {} events, got {}",
                crate::service::MAX_BATCH,
                events.len()
            )));
        }
        Ok(Response::new(
            self.record(events.into_iter().map(event).collect()).await?,
        ))
    }

    async fn record_engagement_stream(
        &self,
        req: Request<Streaming<pb::EngagementEvent>>,
    ) -> Result<Response<pb::RecordResponse>, Status> {
        let mut stream = req.into_inner();
        let mut total = pb::RecordResponse::default();
        let mut batch = Vec::new();
        // Batches of up to 256 events share one append and one fsync.
        loop {
            let next = stream.next().await;
            let end = next.is_none();
            if let Some(msg) = next {
                batch.push(event(msg?));
            }
            if batch.len() >= 256 || (end && !batch.is_empty()) {
                // Each batch of the stream commits on its own: on a failure, say how many
                // events before it were committed (the failed batch itself left nothing).
                let committed = total.accepted;
                let out = self
                    .record(std::mem::take(&mut batch))
                    .await
                    .map_err(|s| {
                        Status::new(
                            s.code(),
                            format!(
                                "{} ({committed} events of this stream were committed before the failure)",
                                s.message()
                            ),
                        )
                    })?;
                total.accepted += out.accepted;
                total.rejected += out.rejected;
                total.sequence = total.sequence.max(out.sequence);
                total
                    .errors
                    .extend(out.errors.into_iter().take(10 - total.errors.len().min(10)));
            }
            if end {
                break;
            }
        }
        Ok(Response::new(total))
    }
}
