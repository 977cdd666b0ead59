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

pub use orchestrator::{Candidates, HomefeedConfig, HomefeedError, Orchestrator, Pick, SyncMode};

use std::future::Future;
use std::sync::Arc;

use tandem_proto::homefeed::v1 as pb;
use tandem_proto::homefeed::v1::homefeed_server::{Homefeed, HomefeedServer};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

impl From<HomefeedError> for Status {
    fn from(e: HomefeedError) -> Status {
        let msg = e.to_string();
        match e {
            HomefeedError::InvalidArgument(_) => Status::invalid_argument(msg),
            HomefeedError::DeadlineExceeded => Status::deadline_exceeded(msg),
            HomefeedError::NoHostAnswered { .. } => Status::unavailable(msg),
            HomefeedError::UserTower(_) => Status::unavailable(msg),
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
            .get_candidates(&r.user_id, r.k, r.exclude_seen)
            .await?;
        Ok(Response::new(pb::GetCandidatesResponse {
            items: c
                .items
                .into_iter()
                .map(|(item_id, score)| pb::Candidate { item_id, score })
                .collect(),
            model_name: c.model_name,
            model_version: c.index_version,
            ann_host: c.host,
            attempts: c.attempts,
            embedding_version: c.embedding_version,
        }))
    }
}

/// Serves the orchestrator on `listener` until `shutdown` resolves.
pub async fn serve(
    core: Arc<Orchestrator>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<HomefeedServer<HomefeedGrpc>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor set is valid");
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
    let metrics = core.metrics().clone();
    tonic::transport::Server::builder()
        .layer(tandem_telemetry::RpcLayer::new(
            tandem_telemetry::Service::Homefeed,
            metrics,
        ))
        .add_service(health)
        .add_service(reflection)
        .add_service(HomefeedServer::new(HomefeedGrpc { core }))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                shutdown.await;
                reporter
                    .set_not_serving::<HomefeedServer<HomefeedGrpc>>()
                    .await;
            },
        )
        .await
}
