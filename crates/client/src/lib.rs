//! Typed clients for every Tandem service — the library another Rust service (or a script's
//! `tandem call`) uses to talk to Tandem, and the one place where endpoints, timeouts, the admin
//! token (and, later, TLS) are set up.
//!
//! - [`AnnClient`]: an ANN host's metadata, search, and the admin LoadVersion/Rollback.
//! - [`UserTowerClient`]: embeddings for a stated version, loaded versions, engagement intake.
//! - [`HomefeedClient`]: candidates for a user.
//! - [`FleetAdmin`]: rollout, rollback and status across ANN hosts and the user tower, with the
//!   registry pins that keep rollback targets alive.
//!
//! Every response's model version is parsed into [`ModelVersion`] here, at the edge: callers
//! never compare version strings. Every call runs in a client span whose W3C trace context
//! travels in the request metadata, so the callee's server span joins the caller's trace.

pub mod ann;
pub mod fleet;
pub mod homefeed;
pub mod usertower;
mod wire;

pub use ann::{AnnClient, HostMetadata, SearchAnswer, SearchQuery, Swapped};
pub use fleet::{FleetAdmin, FleetError, HostStatus, Step};
pub use homefeed::{Answer, HomefeedClient};
/// The gRPC status codes [`ClientError::code`] reports.
pub use tonic::Code;
pub use usertower::{
    EmbedQuery, Embedding, EngagementEvent, LoadedVersion, Recorded, UserTowerClient,
};
pub use wire::Wire;

use std::time::Duration;

use tandem_types::ModelVersion;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tracing::{field, Instrument};

/// How a client connects. The default suits loopback and a local network.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    /// Deadline of a call that does not state its own.
    pub timeout: Duration,
    /// Sent as `authorization: Bearer <token>` on admin calls.
    pub admin_token: Option<String>,
    /// TLS for `https://` addresses: the CA that signed the servers' certificates and, for
    /// mutual TLS, this client's identity.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// HTTP/2 keepalive pings (finds a dead server while a connection idles).
    pub keepalive: Option<Duration>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(60),
            admin_token: None,
            tls: None,
            keepalive: Some(Duration::from_secs(30)),
        }
    }
}

impl ClientOptions {
    pub fn with_admin_token(mut self, token: impl Into<String>) -> Self {
        self.admin_token = Some(token.into());
        self
    }
}

/// Reads a client TLS configuration: the CA certificate (PEM) servers must chain to and, for
/// mutual TLS, this client's certificate and key.
pub fn client_tls(
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> std::io::Result<tonic::transport::ClientTlsConfig> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
    };
    let mut cfg = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
    if let Some((cert, key)) = identity {
        cfg = cfg.identity(tonic::transport::Identity::from_pem(
            read(cert)?,
            read(key)?,
        ));
    }
    Ok(cfg)
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: not a service address (expected e.g. http://127.0.0.1:7101)")]
    InvalidUrl { url: String },
    #[error("{url}: an https:// address needs a CA to verify the server (--tls-ca)")]
    NoTlsConfig { url: String },
    #[error("{url}: TLS setup")]
    Tls {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{url}: cannot connect")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The service answered with a non-OK status (its code is kept for the caller to act on).
    #[error("{url}: {}: {}", code_name(.status.code()), .status.message())]
    Rpc { url: String, status: tonic::Status },
    #[error("{url}: malformed response: {what}")]
    BadResponse { url: String, what: String },
    #[error("the admin token is not valid header text")]
    BadToken,
    #[error("admin call to {url} without an admin token")]
    NoToken { url: String },
}

impl ClientError {
    /// The gRPC code of a refused call (`None` for connection and local errors).
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    /// The status a server relaying this error should answer with: the upstream code where
    /// there was one, UNAVAILABLE where the upstream could not be reached.
    pub fn relay_code(&self) -> tonic::Code {
        match self {
            ClientError::Rpc { status, .. } => status.code(),
            ClientError::Connect { .. } => tonic::Code::Unavailable,
            _ => tonic::Code::Internal,
        }
    }
}

/// The canonical upper-case name of a gRPC code, as the specification writes it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// `host:port` is taken as `http://host:port`; anything else must be an `http(s)://` URL.
pub fn normalize_url(url: &str) -> String {
    let url = url.trim();
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// A lazily connecting channel to `url`: a service that is down now is simply retried by the
/// next call.
pub fn channel(url: &str, opts: &ClientOptions) -> Result<Channel> {
    Ok(endpoint(url, opts)?.connect_lazy())
}

/// A lazily connecting transport to `url`: the lean HTTP/2 one (`wire::Direct`) for
/// plain `http://`, tonic's channel for `https://`.
pub fn lazy_wire(url: &str, opts: &ClientOptions) -> Result<Wire> {
    let ep = endpoint(url, opts)?;
    if ep.uri().scheme_str() == Some("https") {
        return Ok(Wire::Tonic(ep.connect_lazy()));
    }
    Ok(Wire::Direct(wire::Direct::new(
        ep.uri(),
        opts.connect_timeout,
        opts.keepalive,
    )))
}

/// A channel connected now (errors name the address and the cause).
pub async fn connect(url: &str, opts: &ClientOptions) -> Result<Channel> {
    endpoint(url, opts)?
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            url: url.to_string(),
            source,
        })
}

fn endpoint(url: &str, opts: &ClientOptions) -> Result<Endpoint> {
    let full = normalize_url(url);
    if !(full.starts_with("http://") || full.starts_with("https://")) {
        return Err(ClientError::InvalidUrl {
            url: url.to_string(),
        });
    }
    let https = full.starts_with("https://");
    let mut ep = Endpoint::from_shared(full)
        .map_err(|_| ClientError::InvalidUrl {
            url: url.to_string(),
        })?
        .tcp_nodelay(true)
        .connect_timeout(opts.connect_timeout);
    if let Some(k) = opts.keepalive {
        ep = ep
            .http2_keep_alive_interval(k)
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
    }
    if https {
        let tls = opts.tls.clone().ok_or_else(|| ClientError::NoTlsConfig {
            url: url.to_string(),
        })?;
        ep = ep.tls_config(tls).map_err(|source| ClientError::Tls {
            url: url.to_string(),
            source,
        })?;
    }
    Ok(ep)
}

/// The `authorization` header value of `opts`' admin token, checked once at construction.
fn bearer(opts: &ClientOptions) -> Result<Option<MetadataValue<tonic::metadata::Ascii>>> {
    opts.admin_token
        .as_ref()
        .map(|t| {
            format!("Bearer {t}")
                .parse()
                .map_err(|_| ClientError::BadToken)
        })
        .transpose()
}

/// The shared plumbing of one service's client: its URL, default deadline and admin header.
#[derive(Clone)]
struct Target {
    url: String,
    timeout: Duration,
    bearer: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Target {
    fn new(url: &str, opts: &ClientOptions) -> Result<Self> {
        Ok(Target {
            url: url.to_string(),
            timeout: opts.timeout,
            bearer: bearer(opts)?,
        })
    }

    fn request<T>(&self, msg: T, timeout: Option<Duration>) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(timeout.unwrap_or(self.timeout));
        req
    }

    fn admin_request<T>(&self, msg: T, timeout: Option<Duration>) -> Result<tonic::Request<T>> {
        let mut req = self.request(msg, timeout);
        let token = self.bearer.clone().ok_or_else(|| ClientError::NoToken {
            url: self.url.clone(),
        })?;
        req.metadata_mut().insert("authorization", token);
        Ok(req)
    }

    fn refused(&self, status: tonic::Status) -> ClientError {
        ClientError::Rpc {
            url: self.url.clone(),
            status,
        }
    }

    fn malformed(&self, what: impl Into<String>) -> ClientError {
        ClientError::BadResponse {
            url: self.url.clone(),
            what: what.into(),
        }
    }

    fn version(&self, field: &str, s: &str) -> Result<ModelVersion> {
        s.parse()
            .map_err(|e| self.malformed(format!("{field}: {e}")))
    }

    fn optional_version(&self, field: &str, s: &str) -> Result<Option<ModelVersion>> {
        ModelVersion::parse_optional(s).map_err(|e| self.malformed(format!("{field}: {e}")))
    }

    /// Runs one call in a client span named `name`, with the span's trace context injected into
    /// the request's metadata (so the callee's server span becomes its child).
    async fn traced<T, R, F>(
        &self,
        name: &'static str,
        mut req: tonic::Request<T>,
        call: impl FnOnce(tonic::Request<T>) -> F,
    ) -> Result<R>
    where
        F: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let span = tracing::info_span!(
            "rpc.client",
            otel.name = name,
            otel.kind = "client",
            rpc.system = "grpc",
            tandem.peer = %self.url,
            otel.status_code = field::Empty,
        );
        tandem_telemetry::rpc::inject(&span, &mut req);
        let r = call(req).instrument(span.clone()).await;
        if r.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        r.map(tonic::Response::into_inner)
            .map_err(|s| self.refused(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_without_a_scheme_are_taken_as_plain_http() {
        assert_eq!(normalize_url("127.0.0.1:7101"), "http://127.0.0.1:7101");
        assert_eq!(normalize_url(" http://a:1 "), "http://a:1");
        assert!(endpoint("ftp://a:1", &ClientOptions::default()).is_err());
        assert!(endpoint("host:7101", &ClientOptions::default()).is_ok());
    }

    #[test]
    fn refused_calls_keep_the_upstream_code_and_print_it_once() {
        let e = ClientError::Rpc {
            url: "http://h:1".into(),
            status: tonic::Status::failed_precondition("serves v2"),
        };
        assert_eq!(e.code(), Some(tonic::Code::FailedPrecondition));
        assert_eq!(e.relay_code(), tonic::Code::FailedPrecondition);
        assert_eq!(e.to_string(), "http://h:1: FAILED_PRECONDITION: serves v2");
    }
}
