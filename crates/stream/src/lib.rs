//! Engagement events on NATS JetStream: the replicated log that user-tower replicas share and the
//! retrainer reads its window from.
//!
//! **Layout.** One stream (default `engagements`, file storage, replica count and retention
//! configurable) with one subject, `<stream>.events`. A RecordEngagement call becomes one message
//! holding its events as CSV rows in the event-log segment format (a batch larger than the
//! server's payload limit is split into as few messages as fit). A message is therefore the
//! unit of atomicity, and its stream sequence is the `sequence` the service returns.
//!
//! **Reading.** Replicas follow the stream with an ordered consumer ([`EventStream::follow`])
//! from a start time (their state window) or from the sequence after the last one they applied,
//! and apply each message once, in sequence order. [`EventStream::read_since`] reads a window
//! to its current end (the retrainer's training data).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use tandem_data::events::{decode_rows, encode_rows, Event};
use tokio_stream::{Stream, StreamExt};

/// Where the stream lives and how to reach it.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// `nats://host:4222` (or `tls://…`; several servers comma-separated). Credentials may be
    /// given in the URL (`nats://user:pass@host:4222`).
    pub url: String,
    pub stream: String,
    /// JetStream replicas of the stream when this process creates it (1 for a single server,
    /// 3 for a cluster).
    pub replicas: usize,
    /// Messages older than this are dropped by the server (0: kept until removed).
    pub max_age: Duration,
    /// A bearer token, for servers configured with `authorization { token }`.
    pub token: Option<String>,
    /// CA certificate (PEM) the server's certificate chains to; implies TLS.
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM), for servers that verify clients.
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// How long a publish waits for JetStream's acknowledgement.
    pub ack_timeout: Duration,
    /// The client name the server shows in its connection list.
    pub client_name: String,
}

impl NatsOptions {
    pub fn new(url: &str) -> Self {
        NatsOptions {
            url: url.to_string(),
            stream: "engagements".into(),
            replicas: 1,
            max_age: Duration::from_secs(90 * 86_400),
            token: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            ack_timeout: Duration::from_secs(2),
            client_name: "tandem".into(),
        }
    }

    /// The one subject the stream carries.
    pub fn subject(&self) -> String {
        format!("{}.events", self.stream)
    }
}

/// Whether an `--events` argument names a NATS server rather than a path.
pub fn is_nats_url(s: &str) -> bool {
    s.starts_with("nats://") || s.starts_with("tls://")
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The server is unreachable, timed out or refused: the caller may retry later.
    #[error("NATS JetStream unavailable: {0}")]
    Unavailable(String),
    #[error("invalid NATS settings: {0}")]
    Invalid(String),
    /// A message that is not in the engagement format.
    #[error("stream message {sequence}: {reason}")]
    Corrupt { sequence: u64, reason: String },
}

fn unavailable(e: impl std::fmt::Display) -> StreamError {
    StreamError::Unavailable(e.to_string())
}

/// The sequence range of the stream right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tail {
    /// 0 for an empty stream.
    pub last_sequence: u64,
    pub messages: u64,
}

/// Where a follower starts.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// The first message published at or after this unix time.
    Since(i64),
    /// The message after this sequence.
    After(u64),
}

/// One message of the stream as a follower sees it.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub sequence: u64,
    /// When JetStream stored it (unix milliseconds).
    pub published_ms: i64,
    /// Messages after this one the consumer had not yet delivered.
    pub pending: u64,
    pub events: Vec<Event>,
}

/// A connection to the engagement stream.
#[derive(Clone)]
pub struct EventStream {
    client: async_nats::Client,
    js: jetstream::Context,
    opts: NatsOptions,
}

impl EventStream {
    /// Starts connecting (in the background: a server that is down now is retried forever) and
    /// returns at once; nothing is sent until the first call.
    pub async fn connect(opts: &NatsOptions) -> Result<Self, StreamError> {
        if opts.stream.is_empty() || opts.stream.contains(['.', ' ', '*', '>']) {
            return Err(StreamError::Invalid(format!(
                "stream name {:?} must be non-empty without '.', ' ', '*' or '>'",
                opts.stream
            )));
        }
        let mut co = async_nats::ConnectOptions::new()
            .name(&opts.client_name)
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(Duration::from_secs(5))
            .retry_on_initial_connect();
        if let Some(t) = &opts.token {
            co = co.token(t.clone());
        }
        if let Some(ca) = &opts.tls_ca {
            co = co.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&opts.tls_cert, &opts.tls_key) {
            (Some(c), Some(k)) => co = co.add_client_certificate(c.clone(), k.clone()),
            (None, None) => {}
            _ => {
                return Err(StreamError::Invalid(
                    "a client certificate needs both --nats-tls-cert and --nats-tls-key".into(),
                ))
            }
        }
        let client = co
            .connect(opts.url.as_str())
            .await
            .map_err(|e| StreamError::Invalid(format!("{}: {e}", opts.url)))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(opts.ack_timeout);
        let me = EventStream {
            client,
            js,
            opts: opts.clone(),
        };
        // Give a reachable server the moment it takes, so the first call finds it connected.
        for _ in 0..40 {
            if me.connected() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(me)
    }

    pub fn options(&self) -> &NatsOptions {
        &self.opts
    }

    /// Whether the client holds a live connection to a server right now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn check_connected(&self) -> Result<(), StreamError> {
        if self.connected() {
            Ok(())
        } else {
            Err(StreamError::Unavailable(format!(
                "not connected to {}",
                self.opts.url
            )))
        }
    }

    /// Creates the stream if it is missing (file storage); an existing stream is used as it is.
    pub async fn ensure(&self) -> Result<stream::Stream, StreamError> {
        self.check_connected()?;
        let cfg = stream::Config {
            name: self.opts.stream.clone(),
            subjects: vec![self.opts.subject()],
            storage: stream::StorageType::File,
            num_replicas: self.opts.replicas.max(1),
            max_age: self.opts.max_age,
            ..Default::default()
        };
        self.js.get_or_create_stream(cfg).await.map_err(unavailable)
    }

    /// Publishes `events` and returns the stream sequence of the last message once JetStream
    /// acknowledged every message (stored durably on the stream's replicas). An error means
    /// the caller must not treat the events as recorded; when a split batch fails part-way the
    /// message says how many parts were stored before it.
    pub async fn publish(&self, events: &[Event]) -> Result<u64, StreamError> {
        if events.is_empty() {
            return Ok(0);
        }
        // Fail fast rather than let the client buffer a publish for a server that is away
        // (it would be sent on reconnect, after the caller was told it failed).
        self.check_connected()?;
        let limit = self
            .client
            .server_info()
            .max_payload
            .saturating_sub(1024)
            .max(4096);
        let mut parts = Vec::new();
        split_encoded(events, limit, &mut parts)?;
        let subject = self.opts.subject();
        let mut acks = Vec::with_capacity(parts.len());
        for p in parts {
            acks.push(
                self.js
                    .publish(subject.clone(), p.into())
                    .await
                    .map_err(unavailable)?,
            );
        }
        let total = acks.len();
        let mut last = 0;
        for (k, ack) in acks.into_iter().enumerate() {
            let ack = ack.await.map_err(|e| {
                StreamError::Unavailable(if total > 1 {
                    format!("{e} (at least {k} of {total} parts of this batch were stored)")
                } else {
                    e.to_string()
                })
            })?;
            last = ack.sequence;
        }
        Ok(last)
    }

    /// One round trip: looking the stream up returns its current state.
    pub async fn tail(&self) -> Result<Tail, StreamError> {
        self.check_connected()?;
        let s = self
            .js
            .get_stream(&self.opts.stream)
            .await
            .map_err(unavailable)?;
        let info = s.cached_info();
        Ok(Tail {
            last_sequence: info.state.last_sequence,
            messages: info.state.messages,
        })
    }

    /// When message `sequence` was stored (unix milliseconds); `None` if it is gone.
    pub async fn published_ms(&self, sequence: u64) -> Result<Option<i64>, StreamError> {
        self.check_connected()?;
        // A handle without the info round trip: only the message is asked for.
        let s = self
            .js
            .get_stream_no_info(&self.opts.stream)
            .await
            .map_err(unavailable)?;
        match s.get_raw_message(sequence).await {
            Ok(m) => Ok(Some(m.time.timestamp_millis())),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Follows the stream from `start`: every message, in sequence order, decoded. The stream
    /// ends or yields an error when the connection is lost for good; resume with
    /// [`Start::After`] the last sequence applied.
    pub async fn follow(
        &self,
        start: Start,
    ) -> Result<impl Stream<Item = Result<Delivered, StreamError>> + Send + 'static, StreamError>
    {
        let s = self.ensure().await?;
        let deliver_policy = match start {
            Start::Since(t) => consumer::DeliverPolicy::ByStartTime {
                start_time: chrono::DateTime::from_timestamp(t.max(0), 0).unwrap_or_default(),
            },
            Start::After(seq) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: seq + 1,
            },
        };
        let consumer = s
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.opts.subject(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let messages = consumer.messages().await.map_err(unavailable)?;
        Ok(messages.map(|m| {
            let m = m.map_err(unavailable)?;
            let info = m.info().map_err(|e| StreamError::Corrupt {
                sequence: 0,
                reason: e.to_string(),
            })?;
            let sequence = info.stream_sequence;
            let events = decode_rows(&m.payload, false).map_err(|e| StreamError::Corrupt {
                sequence,
                reason: e.to_string(),
            })?;
            Ok(Delivered {
                sequence,
                published_ms: info.published.timestamp_millis(),
                pending: info.pending,
                events,
            })
        }))
    }

    /// Every event published at or after `since` (unix seconds) up to the stream's end when
    /// the call started, in stream order. A message that is not in the engagement format is an
    /// error (the window would silently be short otherwise).
    pub async fn read_since(&self, since: i64) -> Result<Vec<Event>, StreamError> {
        let end = self.tail().await?.last_sequence;
        let mut out = Vec::new();
        if end == 0 {
            return Ok(out);
        }
        let mut follow = Box::pin(self.follow(Start::Since(since)).await?);
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), follow.next())
                .await
                .map_err(|_| unavailable("no message for 10 s while reading the window"))?;
            let Some(d) = next else {
                return Err(unavailable("the consumer ended before the window's end"));
            };
            let d = d?;
            out.extend(d.events);
            if d.sequence >= end || d.pending == 0 {
                return Ok(out);
            }
        }
    }
}

/// Encodes `events` into messages of at most `limit` bytes, halving a slice until it fits.
fn split_encoded(
    events: &[Event],
    limit: usize,
    out: &mut Vec<Vec<u8>>,
) -> Result<(), StreamError> {
    let buf = encode_rows(events).map_err(|e| StreamError::Invalid(e.to_string()))?;
    if buf.len() <= limit {
        out.push(buf);
        return Ok(());
    }
    if events.len() == 1 {
        return Err(StreamError::Invalid(format!(
            "one event encodes to {} bytes, over the server's payload limit",
            buf.len()
        )));
    }
    let (a, b) = events.split_at(events.len() / 2);
    split_encoded(a, limit, out)?;
    split_encoded(b, limit, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(k: usize) -> Event {
        Event {
            user: format!("user-{k}"),
            item: format!("item-{k}"),
            ts: k as i64,
            action: "click".into(),
            weight: 1.0,
        }
    }

    #[test]
    fn a_batch_over_the_payload_limit_splits_into_parts_that_decode_back_in_order() {
        let events: Vec<Event> = (0..1000).map(ev).collect();
        let mut parts = Vec::new();
        split_encoded(&events, 4096, &mut parts).unwrap();
        assert!(parts.len() > 1, "{}", parts.len());
        assert!(parts.iter().all(|p| p.len() <= 4096));
        let back: Vec<Event> = parts
            .iter()
            .flat_map(|p| decode_rows(p, false).unwrap())
            .collect();
        assert_eq!(back, events);
    }

    #[test]
    fn only_nats_schemes_are_streams_and_bad_stream_names_are_refused() {
        assert!(is_nats_url("nats://127.0.0.1:4222"));
        assert!(is_nats_url("tls://nats.example:4222"));
        assert!(!is_nats_url("/artifacts/events"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut o = NatsOptions::new("nats://127.0.0.1:1");
        o.stream = "a.b".into();
        let e = rt.block_on(EventStream::connect(&o)).err().unwrap();
        assert!(e.to_string().contains("stream name"), "{e}");
    }
}
