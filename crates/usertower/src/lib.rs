//! The user-tower service: request-time user embeddings for any of the latest N model versions,
//! fed by live engagement events.
//!
//! - [`online`]: per-user recent engagement and the durable segment log.
//! - [`batch`]: optional micro-batching of Embed calls.
//! - [`service`]: the domain logic ([`UserTower`]): versions, embed, record.
//! - [`replica`]: replicated mode, following the NATS JetStream engagement stream.
//! - [`grpc`]: the thin tonic adapter.
//! - [`serve`]: the registry poller on the server kit (health, reflection, metrics, shutdown).

pub mod batch;
pub mod grpc;
pub mod online;
pub mod replica;
pub mod service;

pub use batch::EmbedBatching;
pub use service::{NatsConfig, UserTower, UserTowerConfig, UserTowerError};

use std::future::Future;
use std::sync::Arc;

use tandem_proto::usertower::v1::user_tower_server::UserTowerServer;
use tandem_server::{Server, ServerOptions};
use tandem_telemetry::Service;
use tokio::net::TcpListener;

/// Serves the user tower on `listener` until `shutdown` resolves. A background task polls the
/// registry every `poll` so newly published versions become servable without a restart; health
/// is NOT_SERVING until at least one version is loaded. Shutdown follows the server kit's
/// sequence, and the poller stops with it.
pub async fn serve(
    core: Arc<UserTower>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    opts: ServerOptions,
) -> Result<(), tonic::transport::Error> {
    let server = Server::new(Service::UserTower, core.metrics().clone(), opts);
    let health = server.health();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let judge = {
        let health = health.clone();
        move |core: &UserTower| match core.not_ready() {
            None => health.set_serving(),
            Some(_) => health.set_not_serving(),
        }
    };
    if let Some(stream) = core.stream().cloned() {
        let window_start = replica::window_start(&core);
        tokio::spawn(replica::follow(
            core.clone(),
            stream.clone(),
            window_start,
            stop_rx.clone(),
        ));
        tokio::spawn(replica::check_loop(
            core.clone(),
            stream,
            window_start,
            stop_rx.clone(),
            judge.clone(),
        ));
    }
    let poller = core.clone();
    tokio::spawn(async move {
        loop {
            if let Err(e) = poller.refresh().await {
                tracing::error!(error = %e, "registry poll failed");
            }
            judge(&poller);
            tokio::select! {
                _ = tokio::time::sleep(poller.config().poll) => {}
                _ = stop_rx.changed() => break,
            }
        }
    });
    let served = server
        .add_service(UserTowerServer::new(grpc::UserTowerGrpc::new(core)))
        .serve(listener, shutdown)
        .await;
    let _ = stop_tx.send(true);
    served
}
