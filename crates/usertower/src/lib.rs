//! The user-tower service: request-time user embeddings for any of the latest N model versions,
//! fed by live engagement events.
//!
//! - [`online`]: per-user recent engagement and the durable segment log.
//! - [`service`]: the domain logic ([`UserTower`]): versions, embed, record.
//! - [`grpc`]: the thin tonic adapter.
//! - [`serve`]: health, reflection, the registry poller, graceful shutdown.

pub mod grpc;
pub mod online;
pub mod service;

pub use service::{UserTower, UserTowerConfig, UserTowerError};

use std::future::Future;
use std::sync::Arc;

use tandem_proto::usertower::v1::user_tower_server::UserTowerServer;
use tokio::net::TcpListener;

/// Serves the user tower on `listener` until `shutdown` resolves. A background task polls the
/// registry every `poll` so newly published versions become servable without a restart; health
/// is NOT_SERVING until at least one version is loaded.
pub async fn serve(
    core: Arc<UserTower>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_not_serving::<UserTowerServer<grpc::UserTowerGrpc>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor set is valid");

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let poller = core.clone();
    let poll_health = reporter.clone();
    tokio::spawn(async move {
        loop {
            match poller.refresh().await {
                Ok(_) if !poller.loaded().is_empty() => {
                    poll_health
                        .set_serving::<UserTowerServer<grpc::UserTowerGrpc>>()
                        .await
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "registry poll failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(poller.config().poll) => {}
                _ = stop_rx.changed() => break,
            }
        }
    });

    let metrics = core.metrics().clone();
    tonic::transport::Server::builder()
        .layer(tandem_telemetry::RpcLayer::new(
            tandem_telemetry::Service::UserTower,
            metrics,
        ))
        .add_service(health)
        .add_service(reflection)
        .add_service(UserTowerServer::new(grpc::UserTowerGrpc::new(core)))
        .serve_with_incoming_shutdown(incoming(listener), async move {
            shutdown.await;
            reporter
                .set_not_serving::<UserTowerServer<grpc::UserTowerGrpc>>()
                .await;
            let _ = stop_tx.send(true);
        })
        .await
}

/// Accepted connections with `TCP_NODELAY`: without it small gRPC responses wait for the peer's
/// delayed ACK (~40 ms per call on loopback).
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
