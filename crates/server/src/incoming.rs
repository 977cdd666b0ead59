//! Accepted connections: `TCP_NODELAY` and TCP keepalive on each socket, an idle timeout that
//! closes a connection after a stretch with no bytes in either direction, and an accept loop
//! that survives running out of file descriptors (it backs off and keeps serving the
//! connections it has, instead of spinning or stopping).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The stream of accepted connections tonic serves.
pub struct Incoming {
    listener: TcpListener,
    idle: Duration,
    keepalive: Option<Duration>,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    pub fn new(listener: TcpListener, idle: Duration, keepalive: Option<Duration>) -> Self {
        Incoming {
            listener,
            idle,
            keepalive,
            backoff: None,
        }
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<IdleIo>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(b) = self.backoff.as_mut() {
            if b.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.backoff = None;
        }
        match self.listener.poll_accept(cx) {
            Poll::Ready(Ok((stream, _))) => {
                let _ = stream.set_nodelay(true);
                if let Some(k) = self.keepalive {
                    let ka = socket2::TcpKeepalive::new().with_time(k).with_interval(k);
                    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka);
                }
                Poll::Ready(Some(Ok(IdleIo::new(stream, self.idle))))
            }
            Poll::Ready(Err(e)) => {
                // EMFILE, ENFILE, ENOMEM, ECONNABORTED…: not fatal. Back off so a full fd table
                // does not turn the accept loop into a busy loop; existing connections go on.
                tracing::warn!(error = %e, "accept failed; retrying in 50 ms");
                self.backoff = Some(Box::pin(tokio::time::sleep(Duration::from_millis(50))));
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

use std::future::Future;

/// A TCP stream that fails with `TimedOut` after `idle` with no bytes read or written.
pub struct IdleIo {
    inner: TcpStream,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl IdleIo {
    fn new(inner: TcpStream, idle: Duration) -> Self {
        IdleIo {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn touch(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.idle);
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "idle connection closed")
}

impl AsyncRead for IdleIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for IdleIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    /// Reported as not vectored, on purpose: HTTP/2 (the `h2` crate) then copies DATA payloads
    /// of up to 1 KiB into its write buffer instead of chaining them as a second I/O slice, and
    /// a chained payload must be written before the next frame can be buffered. A unary
    /// response (HEADERS, DATA, trailers) thus leaves in one `write` instead of two; on loopback
    /// each write costs the sender the receiver's TCP processing too.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl Connected for IdleIo {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}
