//! The homefeed orchestrator and its "anytime sync" protocol.
//!
//! During a rollout some ANN hosts serve version N while others serve N+1, and a rollback can
//! move any host back, so there is no "current" version. Per request the orchestrator therefore:
//!
//! 1. picks an ANN host (round-robin, power-of-two-choices on in-flight requests, or sticky by
//!    user hash);
//! 2. reads **that host's** version metadata (cached per host for a short TTL, dropped whenever
//!    the host refuses a version);
//! 3. asks the user tower for an embedding of **exactly that version**;
//! 4. searches **that same host**, stating the version.
//!
//! If the host flipped between steps 2 and 4 it refuses (`FAILED_PRECONDITION`): refresh and
//! retry once. If the user tower lacks the version (`NOT_FOUND`) or the host is down or slow:
//! try another host. One deadline covers the whole request. An answer is returned only when the
//! host that answered served the version the embedding came from — the host enforces it, and
//! the orchestrator checks the version named in the response as well.
//!
//! `SyncMode::Naive` (newest user-tower version, no handshake, the host told to answer anyway)
//! exists only to measure what skew costs.

pub mod orchestrator;

pub use orchestrator::{
    Ask, Candidates, HomefeedConfig, HomefeedError, Orchestrator, Pick, SyncMode,
};

use std::future::Future;
use std::sync::Arc;

use tandem_proto::homefeed::v1 as pb;
use tandem_proto::homefeed::v1::homefeed_server::{Homefeed, HomefeedServer};
use tandem_server::{Server, ServerOptions};
use tandem_telemetry::Service;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

impl From<HomefeedError> for Status {
    fn from(e: HomefeedError) -> Status {
        let msg = tandem_types::error_chain(&e);
        match e {
            HomefeedError::InvalidArgument(_) => Status::invalid_argument(msg),
            HomefeedError::DeadlineExceeded => Status::deadline_exceeded(msg),
            HomefeedError::NoHostAnswered { .. } => Status::unavailable(msg),
            // The user tower's own code travels on (RESOURCE_EXHAUSTED stays a shed request,
            // UNAVAILABLE an outage), so a caller can tell them apart.
            HomefeedError::UserTower { code, .. } => Status::new(code, msg),
            HomefeedError::Address(_) => Status::internal(msg),
        }
    }
}

/// The thin tonic adapter.
pub struct HomefeedGrpc {
    core: Arc<Orchestrator>,
}

#[tonic::async_trait]
impl Homefeed for HomefeedGrpc {
    async fn get_candidates(
        &self,
        req: Request<pb::GetCandidatesRequest>,
    ) -> Result<Response<pb::GetCandidatesResponse>, Status> {
        let r = req.into_inner();
        let c = self
            .core
            .get_candidates_after(&orchestrator::Ask {
                user: &r.user_id,
                k: r.k,
                exclude_seen: r.exclude_seen,
                min_sequence: r.min_sequence,
            })
            .await?;
        Ok(Response::new(pb::GetCandidatesResponse {
            items: c
                .items
                .into_iter()
                .map(|(item_id, score)| pb::Candidate { item_id, score })
                .collect(),
            model_name: c.model_name,
            model_version: c.index_version.to_string(),
            ann_host: c.host,
            attempts: c.attempts,
            embedding_version: c.embedding_version.to_string(),
        }))
    }
}

/// Serves the orchestrator on `listener` until `shutdown` resolves (the server kit's shutdown
/// sequence). Health is SERVING from the start: each request finds its own hosts.
pub async fn serve(
    core: Arc<Orchestrator>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    opts: ServerOptions,
) -> Result<(), tonic::transport::Error> {
    // The skew gauges are read at scrape time. A weak reference: the registry must not keep
    // the orchestrator alive.
    let weak = Arc::downgrade(&core);
    core.metrics().on_scrape(Arc::new(move || {
        let weak = weak.clone();
        Box::pin(async move {
            if let Some(core) = weak.upgrade() {
                core.observe_hosts().await;
            }
        })
    }));
    let server = Server::new(Service::Homefeed, core.metrics().clone(), opts)
        .add_service(HomefeedServer::new(HomefeedGrpc { core }));
    server.health().set_serving();
    server.serve(listener, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_tower_failure_is_relayed_with_its_own_code_and_cause() {
        let upstream = tandem_client::ClientError::Rpc {
            url: "http://ut:7201".into(),
            status: Status::resource_exhausted("too many requests"),
        };
        let s: Status = HomefeedError::UserTower {
            code: upstream.relay_code(),
            source: upstream,
        }
        .into();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            s.message(),
            "user tower: http://ut:7201: RESOURCE_EXHAUSTED: too many requests"
        );
    }
}
