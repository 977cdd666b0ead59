//! gRPC plumbing shared by the services: the server layer (one span and the request metrics per
//! RPC) and W3C trace-context propagation over gRPC metadata.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::{catalogue, Registry};

struct HeaderReader<'a>(&'a http::HeaderMap);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataWriter<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The remote parent named by a request's `traceparent`/`tracestate` headers (an empty context
/// when there are none).
pub fn extract(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderReader(headers))
}

/// Writes `span`'s trace context into an outgoing request's metadata, so the server's span
/// becomes its child. Does nothing when tracing export is off (the span has no context).
pub fn inject<T>(span: &tracing::Span, req: &mut tonic::Request<T>) {
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataWriter(req.metadata_mut()));
}

/// The `service` label and span attribute of each server.
#[derive(Debug, Clone, Copy)]
pub enum Service {
    Ann,
    UserTower,
    Homefeed,
}

impl Service {
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Ann => "ann",
            Service::UserTower => "user-tower",
            Service::Homefeed => "homefeed",
        }
    }
}

/// Tower layer for a tonic server: per RPC, a server span parented on the caller's trace
/// context, and `tandem_rpc_requests_total` / `tandem_rpc_duration_seconds` by RPC and code.
#[derive(Clone)]
pub struct RpcLayer {
    service: Service,
    metrics: Arc<Registry>,
}

impl RpcLayer {
    pub fn new(service: Service, metrics: Arc<Registry>) -> Self {
        metrics.register(&[catalogue::RPC_REQUESTS, catalogue::RPC_DURATION]);
        RpcLayer { service, metrics }
    }
}

impl<S> tower_layer::Layer<S> for RpcLayer {
    type Service = RpcService<S>;
    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
    layer: RpcLayer,
}

/// Probes and reflection are counted but not traced: they would bury the request traces.
fn traced(path: &str) -> bool {
    !(path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection."))
}

/// gRPC status codes by number, as the label value.
fn code_name(code: &str) -> &'static str {
    match code {
        "0" => "OK",
        "1" => "CANCELLED",
        "2" => "UNKNOWN",
        "3" => "INVALID_ARGUMENT",
        "4" => "DEADLINE_EXCEEDED",
        "5" => "NOT_FOUND",
        "6" => "ALREADY_EXISTS",
        "7" => "PERMISSION_DENIED",
        "8" => "RESOURCE_EXHAUSTED",
        "9" => "FAILED_PRECONDITION",
        "10" => "ABORTED",
        "11" => "OUT_OF_RANGE",
        "12" => "UNIMPLEMENTED",
        "13" => "INTERNAL",
        "14" => "UNAVAILABLE",
        "15" => "DATA_LOSS",
        "16" => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for RpcService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call; the fresh clone stays behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path().to_string();
        let service = self.layer.service.as_str();
        let span = if traced(&path) {
            let (svc, method) = path
                .trim_start_matches('/')
                .split_once('/')
                .unwrap_or((path.as_str(), ""));
            let span = tracing::info_span!(
                "rpc",
                otel.name = %path.trim_start_matches('/'),
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = %svc,
                rpc.method = %method,
                tandem.service = service,
                rpc.grpc.status_code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            let _ = span.set_parent(extract(req.headers()));
            span
        } else {
            tracing::Span::none()
        };
        let metrics = self.layer.metrics.clone();
        let start = Instant::now();
        let fut = inner.call(req);
        Box::pin(
            async move {
                let res = fut.await;
                // tonic puts a handler's error status in the headers of a trailers-only
                // response; a success carries grpc-status 0 in the trailers instead.
                let code = match &res {
                    Ok(r) => r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .map(code_name)
                        .unwrap_or("OK"),
                    Err(_) => "UNKNOWN",
                };
                let current = tracing::Span::current();
                current.record("rpc.grpc.status_code", code);
                if code != "OK" {
                    current.record("otel.status_code", "ERROR");
                }
                // Unrouted paths share one label: a client probing random paths must not be
                // able to create series without bound.
                let rpc = if code == "UNIMPLEMENTED" {
                    "unimplemented"
                } else {
                    path.as_str()
                };
                let labels = [("service", service), ("rpc", rpc), ("code", code)];
                metrics.inc(&catalogue::RPC_REQUESTS, &labels);
                metrics.observe(
                    &catalogue::RPC_DURATION,
                    &labels,
                    start.elapsed().as_secs_f64(),
                );
                res
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn inject_then_extract_carries_the_span_context_and_nothing_without_export() {
        let spans = crate::MemoryExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .build();
        let subscriber = tracing_subscriber::registry().with(crate::span_layer(&provider));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("client");
            let mut req = tonic::Request::new(());
            inject(&span, &mut req);
            let header = req
                .metadata()
                .get("traceparent")
                .expect("traceparent written")
                .to_str()
                .unwrap()
                .to_string();
            let sent = span.context().span().span_context().clone();
            assert!(header.contains(&sent.trace_id().to_string()), "{header}");
            let remote = extract(&req.into_parts().0.into_headers());
            let got = remote.span().span_context().clone();
            assert!(got.is_remote());
            assert_eq!(
                (got.trace_id(), got.span_id()),
                (sent.trace_id(), sent.span_id())
            );
            drop(span);
        });
        assert_eq!(spans.spans().len(), 1, "the client span was exported");

        // No OpenTelemetry layer (export off): nothing is written.
        let mut req = tonic::Request::new(());
        inject(&tracing::info_span!("plain"), &mut req);
        assert!(req.metadata().get("traceparent").is_none());
        assert!(!extract(&http::HeaderMap::new())
            .span()
            .span_context()
            .is_valid());
    }
}
