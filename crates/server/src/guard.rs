//! The guard layer every server runs behind: bounded load and honest status codes.
//!
//! - **Load shedding.** At most `max_in_flight` requests are handled at once across all
//!   connections; one more is answered at once with `RESOURCE_EXHAUSTED` instead of queueing,
//!   so an overloaded server fails fast and its latency stays bounded. Health checks are exempt
//!   (a probe must still see the server alive).
//! - **Decode errors are the caller's fault.** tonic reports a request body that is not valid
//!   protobuf as `INTERNAL`; the guard rewrites that to `INVALID_ARGUMENT`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tonic::body::Body;
use tonic::codegen::http;

#[derive(Clone)]
pub struct GuardLayer {
    permits: Arc<Semaphore>,
    max: usize,
}

impl GuardLayer {
    pub fn new(max_in_flight: usize) -> Self {
        let max = max_in_flight.max(1);
        GuardLayer {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

impl<S> tower_layer::Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    layer: GuardLayer,
}

/// prost's decode error text, percent-encoded as tonic writes it into `grpc-message`.
const DECODE_ERROR: &str = "failed%20to%20decode%20Protobuf%20message";

impl<S> tower_service::Service<http::Request<Body>> for Guard<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let exempt = req.uri().path().starts_with("/grpc.health.");
        let permit = if exempt {
            None
        } else {
            match self.layer.permits.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let status = tonic::Status::resource_exhausted(format!(
                        "overloaded: {} requests already in flight; retry later",
                        self.layer.max
                    ));
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        };
        // The clone that was polled ready serves this call; the fresh clone stays behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut = inner.call(req);
        Box::pin(async move {
            let mut res = fut.await?;
            drop(permit);
            let decode_error = res.headers().get("grpc-status").is_some_and(|s| s == "13")
                && res
                    .headers()
                    .get("grpc-message")
                    .and_then(|m| m.to_str().ok())
                    .is_some_and(|m| m.starts_with(DECODE_ERROR));
            if decode_error {
                res.headers_mut()
                    .insert("grpc-status", http::HeaderValue::from_static("3"));
            }
            Ok(res)
        })
    }
}
