//! The server kit every Tandem gRPC service is built with, so that cross-cutting behaviour is
//! written once: `grpc.health.v1` (the overall status `""` and each main service), reflection,
//! the telemetry [`RpcLayer`](tandem_telemetry::RpcLayer), `TCP_NODELAY` on accepted sockets,
//! the Prometheus endpoint, and one graceful shutdown sequence:
//!
//! 1. health goes NOT_SERVING (load balancers and readiness probes stop sending new traffic);
//! 2. the server keeps serving for the grace period (what is already routed here still lands);
//! 3. the listener closes and in-flight requests drain;
//! 4. the metrics endpoint stops last, so the final scrape still sees the drain.
//!
//! Under it sit the [`guard`] (load shedding, decode errors as `INVALID_ARGUMENT`), the
//! [`incoming`] connection handling (idle timeout, TCP keepalive, an accept loop that survives fd
//! exhaustion), HTTP/2 limits, optional TLS (mutual with a client CA), and [`admin`] (the admin
//! token, compared in constant time, every admin action audited).
//!
//! A service library builds a [`Server`], adds its tonic services, hands out [`Health`] to whatever
//! decides readiness (an ANN host once its index is loaded), and calls [`Server::serve`].

pub mod admin;
pub mod guard;
pub mod incoming;

pub use admin::AdminToken;

use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tandem_telemetry::{Registry, RpcLayer, Service};
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;

/// Per-process server settings the binary decides (the library decides the rest).
#[derive(Debug, Default)]
pub struct ServerOptions {
    /// How long the server keeps serving after health went NOT_SERVING and before it stops
    /// accepting (load balancers need a moment to notice).
    pub grace: Duration,
    /// The Prometheus endpoint (`GET /metrics`), already bound; none when `None`.
    pub metrics: Option<TcpListener>,
    /// Serve TLS (mutual when the config holds a client CA); plain text when `None`.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    pub limits: Limits,
}

/// Bounds on load and on connections.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Requests handled at once across all connections; more are shed with RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// A connection with no bytes in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// TCP keepalive on accepted sockets (finds dead peers without adding traffic).
    pub tcp_keepalive: Duration,
    /// Streams a client may reset before the server accepts them, per connection. A client
    /// whose deadlines expire while this server is stalled resets many at once; h2's default
    /// (20) then kills the whole connection and every request on it.
    pub max_pending_accept_reset_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_in_flight: 1024,
            max_concurrent_streams: 512,
            idle_timeout: Duration::from_secs(300),
            tcp_keepalive: Duration::from_secs(60),
            max_pending_accept_reset_streams: 4096,
        }
    }
}

/// Reads a server's TLS identity (PEM certificate chain and key) and, for mutual TLS, the CA
/// client certificates must chain to.
pub fn server_tls(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> std::io::Result<tonic::transport::ServerTlsConfig> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
    };
    let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
    let mut cfg = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = client_ca {
        cfg = cfg.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    Ok(cfg)
}

/// The readiness of one server's main services, settable from anywhere (synchronously: the
/// server forwards every change to `grpc.health.v1`).
#[derive(Clone)]
pub struct Health {
    state: Arc<tokio::sync::watch::Sender<Readiness>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readiness {
    Serving,
    NotServing,
    /// Shutting down: NOT_SERVING for good, whatever else asks.
    Closing,
}

impl Health {
    pub fn set_serving(&self) {
        self.state.send_if_modified(|s| {
            let change = *s == Readiness::NotServing;
            if change {
                *s = Readiness::Serving;
            }
            change
        });
    }

    pub fn set_not_serving(&self) {
        self.state.send_if_modified(|s| {
            let change = *s == Readiness::Serving;
            if change {
                *s = Readiness::NotServing;
            }
            change
        });
    }

    fn close(&self) {
        self.state.send_replace(Readiness::Closing);
    }

    pub fn is_serving(&self) -> bool {
        *self.state.borrow() == Readiness::Serving
    }
}

/// Writes `r` as the status of the overall server (`""`, what a probe without a service name —
/// a Kubernetes gRPC readiness probe — reads) and of each main service.
async fn report(
    reporter: &tonic_health::server::HealthReporter,
    names: &[&'static str],
    r: Readiness,
) {
    let status = if r == Readiness::Serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    for name in names {
        reporter.set_service_status(name, status).await;
    }
}

/// One gRPC server under construction.
pub struct Server {
    service: Service,
    metrics: Arc<Registry>,
    opts: ServerOptions,
    routes: RoutesBuilder,
    reporter: tonic_health::server::HealthReporter,
    names: Vec<&'static str>,
    health: Health,
}

impl Server {
    /// A server for `service` whose RPCs are counted in `metrics`. Health starts NOT_SERVING
    /// until [`Health::set_serving`].
    pub fn new(service: Service, metrics: Arc<Registry>, opts: ServerOptions) -> Self {
        let (reporter, health) = tonic_health::server::health_reporter();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("the embedded descriptor set is valid");
        let mut routes = RoutesBuilder::default();
        routes.add_service(health).add_service(reflection);
        Server {
            service,
            metrics,
            opts,
            routes,
            reporter,
            names: Vec::new(),
            health: Health {
                state: Arc::new(tokio::sync::watch::channel(Readiness::NotServing).0),
            },
        }
    }

    /// Adds a main service: its health status follows [`Health`].
    pub fn add_service<S>(mut self, svc: S) -> Self
    where
        S: tower_service::Service<
                tonic::codegen::http::Request<Body>,
                Error = Infallible,
                Response = tonic::codegen::http::Response<Body>,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(svc);
        self
    }

    /// The readiness handle of this server's main services.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Serves on `listener` until `shutdown` resolves, then runs the shutdown sequence (see the
    /// crate docs). Health is NOT_SERVING until a [`Health`] handle says otherwise.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let health = self.health.clone();
        let grace = self.opts.grace;
        // Health changes are forwarded to the health service from here on.
        let mut changes = health.state.subscribe();
        let initial = *changes.borrow_and_update();
        report(&self.reporter, &self.names, initial).await;
        let (reporter, names) = (self.reporter.clone(), self.names.clone());
        let forward = tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let now = *changes.borrow_and_update();
                report(&reporter, &names, now).await;
                if now == Readiness::Closing {
                    break;
                }
            }
        });
        let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
        let metrics_task = self.opts.metrics.map(|l| {
            tokio::spawn(tandem_telemetry::serve_metrics(
                self.metrics.clone(),
                l,
                async move {
                    let _ = metrics_stopped.await;
                },
            ))
        });
        let signal = async move {
            shutdown.await;
            health.close();
            let _ = forward.await;
            if !grace.is_zero() {
                tracing::info!(
                    grace_ms = grace.as_millis() as u64,
                    "not serving; grace period before draining"
                );
                tokio::time::sleep(grace).await;
            }
            tracing::info!("draining in-flight requests");
        };
        let l = self.opts.limits.clone();
        let mut builder = tonic::transport::Server::builder()
            .max_concurrent_streams(l.max_concurrent_streams)
            .http2_max_pending_accept_reset_streams(Some(l.max_pending_accept_reset_streams));
        if let Some(tls) = self.opts.tls {
            builder = builder.tls_config(tls)?;
        }
        let served = builder
            .layer(RpcLayer::new(self.service, self.metrics))
            .layer(guard::GuardLayer::new(l.max_in_flight))
            .add_routes(self.routes.routes())
            .serve_with_incoming_shutdown(
                incoming::Incoming::new(listener, l.idle_timeout, Some(l.tcp_keepalive)),
                signal,
            )
            .await;
        let _ = stop_metrics.send(());
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        served
    }
}

/// Runs request-path CPU work: inline on the async worker when `cheap` (tens of microseconds,
/// where a hand-off to the blocking pool — a thread wake-up and two context switches — costs
/// more than the work), else on the blocking pool so a long computation cannot stall the
/// worker's other requests. An error only if the blocking task panicked.
pub async fn run_cpu<T, F>(cheap: bool, f: F) -> Result<T, tokio::task::JoinError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if cheap {
        Ok(f())
    } else {
        tokio::task::spawn_blocking(f).await
    }
}
