//! The ANN host ("Manas-style"): serves one index version at a time, says which through its
//! version metadata, refuses searches embedded by another model version, and swaps versions
//! without failing a request.
//!
//! - [`host`]: the domain logic ([`AnnHost`]): load, swap, rollback, search.
//! - [`grpc`]: the thin tonic adapter and the one `AnnError → Status` mapping.
//! - [`serve`]: mounts the service on the server kit (health, reflection, metrics, shutdown).

pub mod grpc;
pub mod host;

pub use host::{AnnConfig, AnnError, AnnHost, MAX_EXCLUDE};

use std::future::Future;
use std::sync::Arc;

use tandem_proto::ann::v1::ann_search_server::AnnSearchServer;
use tandem_server::{Server, ServerOptions};
use tandem_telemetry::Service;
use tokio::net::TcpListener;

/// Serves the ANN host on `listener` until `shutdown` resolves.
///
/// Health is NOT_SERVING until the first version has loaded (in the background, so the port
/// answers while a large index loads). Shutdown follows the server kit's sequence.
pub async fn serve(
    host: Arc<AnnHost>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    opts: ServerOptions,
) -> Result<(), tonic::transport::Error> {
    let server = Server::new(Service::Ann, host.metrics().clone(), opts);
    let adapter = grpc::AnnGrpc::new(host, server.health());
    let initial = adapter.clone();
    tokio::spawn(async move {
        if let Err(e) = initial.load_initial().await {
            tracing::error!(error = %e, "initial index load failed; host stays NOT_SERVING until a LoadVersion succeeds");
        }
    });
    server
        .add_service(AnnSearchServer::new(adapter).max_decoding_message_size(16 << 20))
        .serve(listener, shutdown)
        .await
}
