//! The transport under the typed clients.
//!
//! Plain `http://` services on the serving path are reached over [`Direct`]: one HTTP/2
//! connection per service, driven by the `h2` crate, carrying unary gRPC calls. It exists for
//! the write count. Through tonic's channel (a buffer task in front of hyper) a unary call's
//! HEADERS leave in one `write` and its DATA in a second, because hyper hands the request body
//! to a task of its own that waits for the stream to open; here both frames are queued in the
//! same step and leave in one `write`, with no buffer task and no body task per call. On
//! loopback each write also costs the sender the receiver's TCP processing, so an orchestrator
//! request (two outbound calls) saves two writes and two task hand-offs.
//!
//! `https://` services, and clients connected eagerly, keep tonic's channel ([`Wire::Tonic`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::body::Body;
use tonic::transport::Channel;
use tonic::Status;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a typed client sends its calls through.
#[derive(Clone)]
pub enum Wire {
    Tonic(Channel),
    Direct(Direct),
}

impl tower_service::Service<Request<Body>> for Wire {
    type Response = Response<Body>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = BoxFuture<Result<Response<Body>, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            Wire::Tonic(c) => c.poll_ready(cx).map_err(Into::into),
            Wire::Direct(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        match self {
            Wire::Tonic(c) => {
                let f = c.call(req);
                Box::pin(async move { f.await.map_err(Into::into) })
            }
            Wire::Direct(d) => {
                let d = d.0.clone();
                Box::pin(async move { d.unary(req).await.map_err(Into::into) })
            }
        }
    }
}

/// Unary gRPC calls over one lazily (re)connected HTTP/2 connection to a plain-TCP service.
#[derive(Clone)]
pub struct Direct(Arc<Target>);

struct Target {
    /// `host:port`, as resolved by `TcpStream::connect`.
    addr: String,
    authority: Authority,
    connect_timeout: Duration,
    keepalive: Option<Duration>,
    /// The live connection and its number (a failed call drops only the connection it used,
    /// not one another call opened since).
    conn: Mutex<Option<(u64, SendRequest<Bytes>)>>,
    opened: std::sync::atomic::AtomicU64,
}

/// HTTP/2 windows as hyper's defaults (tonic's channel): large enough that a response never
/// waits for a WINDOW_UPDATE.
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 5 << 20;

impl Direct {
    /// A transport to `url` (`http://host:port`), connecting on first use.
    pub fn new(url: &http::Uri, connect_timeout: Duration, keepalive: Option<Duration>) -> Self {
        let authority = url
            .authority()
            .cloned()
            .unwrap_or_else(|| Authority::from_static("localhost"));
        let port = authority.port_u16().unwrap_or(80);
        Direct(Arc::new(Target {
            addr: format!("{}:{port}", authority.host()),
            authority,
            connect_timeout,
            keepalive,
            conn: Mutex::new(None),
            opened: Default::default(),
        }))
    }
}

impl Target {
    async fn unary(self: Arc<Self>, req: Request<Body>) -> Result<Response<Body>, Status> {
        let (mut parts, body) = req.into_parts();
        let timeout = parts
            .headers
            .get("grpc-timeout")
            .and_then(|v| parse_timeout(v.to_str().ok()?));
        // A unary request body is one encoded message, ready at once.
        let data = body
            .collect()
            .await
            .map_err(|e| Status::internal(format!("encoding the request: {e}")))?
            .to_bytes();
        let mut uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone());
        if let Some(p) = parts.uri.path_and_query() {
            uri = uri.path_and_query(p.clone());
        }
        parts.uri = uri
            .build()
            .map_err(|e| Status::internal(format!("request URI: {e}")))?;
        let call = async {
            let (n, mut sender) = self.sender().await?;
            let (response, mut stream) = sender
                .send_request(Request::from_parts(parts, ()), false)
                .map_err(|e| self.failed(n, e))?;
            stream
                .send_data(data, true)
                .map_err(|e| self.failed(n, e))?;
            let response = response.await.map_err(|e| self.failed(n, e))?;
            Ok(response.map(|b| {
                Body::new(Recv {
                    stream: b,
                    state: RecvState::Data,
                })
            }))
        };
        match timeout {
            Some(t) => tokio::time::timeout(t, call)
                .await
                .map_err(|_| Status::cancelled("Timeout expired"))?,
            None => call.await,
        }
    }

    /// A connection ready for a new stream: the live one, or a new one if it broke.
    async fn sender(&self) -> Result<(u64, SendRequest<Bytes>), Status> {
        let live = self.conn.lock().expect("connection slot").clone();
        if let Some((n, s)) = live {
            match s.ready().await {
                Ok(s) => return Ok((n, s)),
                Err(e) => {
                    tracing::debug!(peer = %self.addr, error = %e, "connection closed; reconnecting");
                    self.drop_conn(n);
                }
            }
        }
        let s = self.connect().await?;
        let n = self
            .opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.conn.lock().expect("connection slot") = Some((n, s.clone()));
        let s = s.ready().await.map_err(|e| self.failed(n, e))?;
        Ok((n, s))
    }

    async fn connect(&self) -> Result<SendRequest<Bytes>, Status> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Status::unavailable(format!("cannot connect to {}: {e}", self.addr))
        };
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| unreachable(&"connect timed out"))?
            .map_err(|e| unreachable(&e))?;
        let _ = tcp.set_nodelay(true);
        if let Some(k) = self.keepalive {
            let ka = socket2::TcpKeepalive::new().with_time(k).with_interval(k);
            let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&ka);
        }
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .enable_push(false)
            .handshake::<_, Bytes>(Unchained(tcp))
            .await
            .map_err(|e| unreachable(&e))?;
        let peer = self.addr.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
        Ok(sender)
    }

    fn drop_conn(&self, n: u64) {
        let mut slot = self.conn.lock().expect("connection slot");
        if slot.as_ref().is_some_and(|(m, _)| *m == n) {
            *slot = None;
        }
    }

    /// The status of a call that failed in the transport; a broken connection is dropped so
    /// the next call opens a new one.
    fn failed(&self, n: u64, e: h2::Error) -> Status {
        if e.is_io() || e.is_go_away() || e.is_library() {
            self.drop_conn(n);
            return Status::unavailable(format!("{}: connection lost: {e}", self.addr));
        }
        stream_status(e)
    }
}

/// A stream-level failure as tonic reports it over its own channel.
fn stream_status(e: h2::Error) -> Status {
    match e.reason() {
        Some(h2::Reason::REFUSED_STREAM) => Status::unavailable(e.to_string()),
        Some(h2::Reason::CANCEL) => Status::cancelled(e.to_string()),
        Some(h2::Reason::ENHANCE_YOUR_CALM) => Status::resource_exhausted(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// A `grpc-timeout` header value (`<digits><unit>`).
fn parse_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A response body: DATA frames (their flow-control capacity handed back as they arrive),
/// then the trailers that carry the gRPC status.
struct Recv {
    stream: h2::RecvStream,
    state: RecvState,
}

#[derive(PartialEq)]
enum RecvState {
    Data,
    Trailers,
    Done,
}

impl http_body::Body for Recv {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.state == RecvState::Data {
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(b)) => {
                    let _ = self.stream.flow_control().release_capacity(b.len());
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Some(Err(e)) => {
                    self.state = RecvState::Done;
                    return Poll::Ready(Some(Err(body_status(e))));
                }
                None => self.state = RecvState::Trailers,
            }
        }
        if self.state == RecvState::Trailers {
            let r = ready!(self.stream.poll_trailers(cx));
            self.state = RecvState::Done;
            return Poll::Ready(match r {
                Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
                Ok(None) => None,
                Err(e) => Some(Err(body_status(e))),
            });
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.state == RecvState::Done
    }
}

fn body_status(e: h2::Error) -> Status {
    if e.is_io() || e.is_go_away() {
        Status::unavailable(format!("connection lost: {e}"))
    } else {
        stream_status(e)
    }
}

/// A TCP stream that tells `h2` it does not take vectored writes, so that DATA payloads up to
/// 1 KiB are copied into the write buffer behind the HEADERS instead of being chained as a
/// second slice (which must be written before the next frame can be buffered).
struct Unchained(TcpStream);

impl AsyncRead for Unchained {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Unchained {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_garbage_is_ignored() {
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "m", "12", "12x", "123456789m", "-1m"] {
            assert_eq!(parse_timeout(bad), None, "{bad}");
        }
    }
}
