//! The ANN host ("Manas-style"): serves one index version at a time, says which through its
//! version metadata, refuses searches embedded by another model version, and swaps versions
//! without failing a request.
//!
//! - [`host`]: the domain logic ([`AnnHost`]): load, swap, rollback, search.
//! - [`grpc`]: the thin tonic adapter and the one `AnnError → Status` mapping.
//! - [`serve`]: mounts the service with health and reflection on a listener the caller bound.

pub mod grpc;
pub mod host;

pub use host::{AnnConfig, AnnError, AnnHost};

use std::future::Future;
use std::sync::Arc;

use tandem_proto::ann::v1::ann_search_server::AnnSearchServer;
use tokio::net::TcpListener;

/// Serves the ANN host on `listener` until `shutdown` resolves.
///
/// Health is NOT_SERVING until the first version has loaded (in the background, so the port
/// answers while a large index loads). On shutdown, health goes NOT_SERVING first, then the
/// server stops accepting and drains in-flight requests.
pub async fn serve(
    host: Arc<AnnHost>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_not_serving::<AnnSearchServer<grpc::AnnGrpc>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor set is valid");

    let adapter = grpc::AnnGrpc::new(host.clone(), reporter.clone());
    let initial = adapter.clone();
    tokio::spawn(async move {
        if let Err(e) = initial.load_initial().await {
            tracing::error!(error = %e, "initial index load failed; host stays NOT_SERVING until a LoadVersion succeeds");
        }
    });

    let svc = AnnSearchServer::new(adapter).max_decoding_message_size(16 << 20);
    let metrics = host.metrics().clone();
    tonic::transport::Server::builder()
        .layer(tandem_telemetry::RpcLayer::new(
            tandem_telemetry::Service::Ann,
            metrics,
        ))
        .add_service(health)
        .add_service(reflection)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming(listener), async move {
            shutdown.await;
            reporter
                .set_not_serving::<AnnSearchServer<grpc::AnnGrpc>>()
                .await;
        })
        .await
}

/// Accepted connections with `TCP_NODELAY`: without it small gRPC responses wait for the peer's
/// delayed ACK (~40 ms per call on loopback).
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
