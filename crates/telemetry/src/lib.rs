//! Telemetry for every Tandem process: logs, OpenTelemetry traces and Prometheus metrics.
//!
//! - [`init`]: the process-wide `tracing` subscriber. Logs go to stderr (filter `TANDEM_LOG`).
//!   When `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans are also exported over OTLP/gRPC to that
//!   collector; otherwise no exporter exists and spans cost only what `tracing` costs.
//! - [`rpc`]: the tonic server layer (a span and request metrics per RPC) and W3C trace-context
//!   propagation over gRPC metadata, so one `GetCandidates` is one trace across the
//!   orchestrator, the user tower and the ANN host.
//! - [`metrics`]: the per-service registry, the metric catalogue and the `/metrics` endpoint.

pub mod metrics;
pub mod rpc;

pub use metrics::{accept_until, catalogue, serve_metrics, Registry};
pub use rpc::{RpcLayer, Service};

use std::sync::{Arc, Mutex};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The standard variable naming the collector; export is off when it is unset or empty.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("building the OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("starting the exporter runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Keeps the exporter alive; dropping it flushes the spans not yet sent.
#[must_use = "dropping the guard shuts the exporter down"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("warning: flushing traces failed: {e}");
            }
        }
    }
}

/// Installs the global subscriber for a process named `service` (the OpenTelemetry
/// `service.name`, unless `OTEL_SERVICE_NAME` says otherwise).
pub fn init(service: &str) -> Result<Telemetry, TelemetryError> {
    // Colour only on a terminal: files and `docker compose logs` get plain text.
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        );
    let endpoint = std::env::var(OTLP_ENDPOINT_ENV).unwrap_or_default();
    if endpoint.trim().is_empty() {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Telemetry { provider: None });
    }
    let exporter = OnOwnRuntime::otlp(&endpoint)?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource(service))
        .build();
    tracing_subscriber::registry()
        .with(logs)
        .with(span_layer(&provider))
        .init();
    Ok(Telemetry {
        provider: Some(provider),
    })
}

fn resource(service: &str) -> Resource {
    let b = Resource::builder();
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|s| !s.is_empty());
    if named {
        b.build()
    } else {
        b.with_service_name(service.to_string()).build()
    }
}

/// The `tracing` → OpenTelemetry layer for `provider`: INFO spans and above (ours; the HTTP/2
/// stack's spans are at DEBUG and TRACE).
pub fn span_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tandem"))
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
}

/// The OTLP/gRPC exporter on a runtime of its own.
///
/// The SDK's batch processor exports from a plain thread with a blocking executor, but tonic's
/// connections need a Tokio reactor; each export is therefore spawned onto a one-thread runtime
/// this exporter owns, and the processor waits for the result.
#[derive(Debug)]
struct OnOwnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Runtime,
}

impl OnOwnRuntime {
    fn otlp(endpoint: &str) -> Result<Self, TelemetryError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()?;
        // The channel is created (lazily connecting) inside the runtime it will run on.
        let inner = {
            let _entered = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| TelemetryError::Exporter {
                    endpoint: endpoint.to_string(),
                    reason: e.to_string(),
                })?
        };
        Ok(OnOwnRuntime {
            inner: Arc::new(inner),
            runtime,
        })
    }
}

impl SpanExporter for OnOwnRuntime {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let task = self.runtime.spawn(async move { inner.export(batch).await });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    e.to_string(),
                ))
            })
        }
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// Keeps finished spans in memory: for tests that assert on traces without a collector.
#[derive(Debug, Clone, Default)]
pub struct MemoryExporter {
    spans: Arc<Mutex<Vec<SpanData>>>,
}

impl MemoryExporter {
    pub fn spans(&self) -> Vec<SpanData> {
        self.spans.lock().expect("lock poisoned").clone()
    }
}

impl SpanExporter for MemoryExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.spans.lock().expect("lock poisoned").extend(batch);
        Ok(())
    }
}
