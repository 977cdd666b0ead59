//! Prometheus metrics: a small registry, the metric catalogue and the scrape endpoint.
//!
//! Every service owns one [`Registry`] (not a process global, so an in-process cluster keeps each
//! service's numbers apart, as separate processes would). Updates take one short mutex; at the
//! request rates of one process this costs well under a microsecond. Gauges that describe the
//! world rather than count events (the version a host serves, the hosts per version the
//! orchestrator sees) are refreshed by collectors run at scrape time.
//!
//! Names, types and help texts live in [`catalogue`], the one list the README's table is kept in
//! line with.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Upper bounds of the buckets (`+Inf` is implied).
    Histogram(&'static [f64]),
}

/// A metric's identity: name, help and type.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
}

impl Metric {
    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        Metric {
            name,
            help,
            kind: Kind::Counter,
        }
    }
    pub const fn gauge(name: &'static str, help: &'static str) -> Self {
        Metric {
            name,
            help,
            kind: Kind::Gauge,
        }
    }
    pub const fn histogram(name: &'static str, help: &'static str, b: &'static [f64]) -> Self {
        Metric {
            name,
            help,
            kind: Kind::Histogram(b),
        }
    }
}

/// Every metric Tandem exports.
pub mod catalogue {
    use super::Metric;

    /// RPC latency buckets (seconds): 0.25 ms to 2.5 s.
    pub const LATENCY: &[f64] = &[
        0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
    /// Index swap buckets (seconds): 10 ms to 2 min.
    pub const SWAP: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

    pub const RPC_REQUESTS: Metric = Metric::counter(
        "tandem_rpc_requests_total",
        "gRPC requests handled, by service, RPC and status code.",
    );
    pub const RPC_DURATION: Metric = Metric::histogram(
        "tandem_rpc_duration_seconds",
        "gRPC handling time until response headers, by service, RPC and status code.",
        LATENCY,
    );

    pub const ANN_SERVING_VERSION: Metric = Metric::gauge(
        "tandem_ann_serving_version",
        "Model version number of the index this ANN host serves (0 before the first load).",
    );
    pub const ANN_INDEX_ITEMS: Metric =
        Metric::gauge("tandem_ann_index_items", "Items in the served index.");
    pub const ANN_SWAPS: Metric = Metric::counter(
        "tandem_ann_swaps_total",
        "Index swaps, by kind (load, rollback) and result (ok, error).",
    );
    pub const ANN_SWAP_DURATION: Metric = Metric::histogram(
        "tandem_ann_swap_duration_seconds",
        "Time to read, verify and swap in an index version.",
        SWAP,
    );
    pub const ANN_VERSION_REFUSALS: Metric = Metric::counter(
        "tandem_ann_version_refusals_total",
        "Searches refused because the embedding came from another model version.",
    );

    pub const UT_VERSIONS_LOADED: Metric = Metric::gauge(
        "tandem_usertower_versions_loaded",
        "Model versions the user tower holds; one series per version, value 1.",
    );
    pub const UT_EMBEDDINGS: Metric = Metric::counter(
        "tandem_usertower_embeddings_total",
        "User embeddings served, by model version.",
    );
    pub const UT_EMBED_BATCHES: Metric = Metric::counter(
        "tandem_usertower_embed_batches_total",
        "Batched forwards run by the Embed micro-batcher (embeddings / batches: mean batch size).",
    );
    pub const UT_VERSION_REFUSALS: Metric = Metric::counter(
        "tandem_usertower_version_refusals_total",
        "Embed requests for a version the user tower does not hold.",
    );
    pub const UT_EVENTS: Metric = Metric::counter(
        "tandem_usertower_events_total",
        "Engagement events received, by result (accepted, rejected).",
    );
    pub const UT_LOAD_FAILURES: Metric = Metric::counter(
        "tandem_usertower_version_load_failures_total",
        "Model versions that failed to load or verify (skipped, never served), by version.",
    );
    pub const UT_REPLICATION_LAG: Metric = Metric::gauge(
        "tandem_usertower_replication_lag_seconds",
        "How stale this replica's engagement state is: the age of the oldest stream message it has not applied (0 when caught up).",
    );
    pub const UT_APPLIED_SEQUENCE: Metric = Metric::gauge(
        "tandem_usertower_applied_sequence",
        "The last engagement-stream sequence this replica applied (the local log's event count in embedded mode).",
    );

    pub const HF_HOSTS_PER_VERSION: Metric = Metric::gauge(
        "tandem_homefeed_hosts_per_version",
        "ANN hosts serving each version, as the orchestrator sees them (version skew).",
    );
    pub const HF_VERSIONS_LIVE: Metric = Metric::gauge(
        "tandem_homefeed_versions_live",
        "Distinct versions served across the ANN hosts; above 1 during a rollout.",
    );
    pub const HF_HOSTS_UNREACHABLE: Metric = Metric::gauge(
        "tandem_homefeed_hosts_unreachable",
        "ANN hosts whose version metadata could not be read at the last scrape.",
    );
    pub const HF_ANSWERS: Metric = Metric::counter(
        "tandem_homefeed_answers_total",
        "GetCandidates answers, by the model version that produced them.",
    );
    pub const HF_HANDSHAKE_RETRIES: Metric = Metric::counter(
        "tandem_homefeed_handshake_retries_total",
        "Handshakes repeated because a host switched versions between metadata and search.",
    );
    pub const HF_VERSION_REFUSALS: Metric = Metric::counter(
        "tandem_homefeed_version_refusals_total",
        "Version refusals met, by source (ann: host switched; user_tower: version not held).",
    );
    pub const HF_FAILOVERS: Metric = Metric::counter(
        "tandem_homefeed_failovers_total",
        "Times a request moved on to another ANN host.",
    );

    pub const RETRAIN_CYCLES: Metric = Metric::counter(
        "tandem_retrain_cycles_total",
        "Retrain cycles, by outcome (deployed, skipped, rejected, rolled_back, failed).",
    );
    pub const RETRAIN_LAST_CYCLE: Metric = Metric::gauge(
        "tandem_retrain_last_cycle_timestamp_seconds",
        "Unix time the last cycle ended, by outcome.",
    );
    pub const RETRAIN_SERVING_VERSION: Metric = Metric::gauge(
        "tandem_retrain_serving_version",
        "Model version number most hosts served after the last cycle.",
    );

    /// All of them, for documentation and tests.
    pub const ALL: &[Metric] = &[
        RPC_REQUESTS,
        RPC_DURATION,
        ANN_SERVING_VERSION,
        ANN_INDEX_ITEMS,
        ANN_SWAPS,
        ANN_SWAP_DURATION,
        ANN_VERSION_REFUSALS,
        UT_VERSIONS_LOADED,
        UT_EMBEDDINGS,
        UT_EMBED_BATCHES,
        UT_VERSION_REFUSALS,
        UT_EVENTS,
        UT_REPLICATION_LAG,
        UT_APPLIED_SEQUENCE,
        UT_LOAD_FAILURES,
        HF_HOSTS_PER_VERSION,
        HF_VERSIONS_LIVE,
        HF_HOSTS_UNREACHABLE,
        HF_ANSWERS,
        HF_HANDSHAKE_RETRIES,
        HF_VERSION_REFUSALS,
        HF_FAILOVERS,
        RETRAIN_CYCLES,
        RETRAIN_LAST_CYCLE,
        RETRAIN_SERVING_VERSION,
    ];
}

type Labels = Vec<(&'static str, String)>;

enum Series {
    Value(f64),
    Histogram {
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

struct Family {
    metric: Metric,
    /// Sorted by labels, so a hot-path update finds its series by binary search over borrowed
    /// labels (no key allocated) and rendering keeps a stable order.
    series: Vec<(Labels, Series)>,
}

impl Family {
    /// Where the series labelled `l` is (`Ok`), or where it belongs (`Err`).
    fn find(&self, l: &[(&'static str, &str)]) -> Result<usize, usize> {
        self.series.binary_search_by(|(k, _)| {
            k.iter()
                .map(|(n, v)| (*n, v.as_str()))
                .cmp(l.iter().copied())
        })
    }
}

/// `m`'s family, created empty on first use.
fn family<'a>(fams: &'a mut BTreeMap<&'static str, Family>, m: &Metric) -> &'a mut Family {
    fams.entry(m.name).or_insert_with(|| Family {
        metric: *m,
        series: Vec::new(),
    })
}

/// Runs at scrape time, before rendering.
pub type Collector = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// One service's metrics.
#[derive(Default)]
pub struct Registry {
    families: Mutex<BTreeMap<&'static str, Family>>,
    collectors: Mutex<Vec<Collector>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

fn labels(l: &[(&'static str, &str)]) -> Labels {
    l.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

impl Registry {
    pub fn new() -> Arc<Self> {
        Arc::new(Registry::default())
    }

    /// Makes `metrics` appear in the exposition (with no samples) before their first update.
    pub fn register(&self, metrics: &[Metric]) {
        let mut fams = self.families.lock().expect("metrics lock poisoned");
        for m in metrics {
            family(&mut fams, m);
        }
    }

    fn with_series(&self, m: &Metric, l: &[(&'static str, &str)], f: impl FnOnce(&mut Series)) {
        let mut fams = self.families.lock().expect("metrics lock poisoned");
        let fam = family(&mut fams, m);
        let at = fam.find(l).unwrap_or_else(|at| {
            let fresh = match m.kind {
                Kind::Histogram(b) => Series::Histogram {
                    counts: vec![0; b.len()],
                    sum: 0.0,
                    count: 0,
                },
                _ => Series::Value(0.0),
            };
            fam.series.insert(at, (labels(l), fresh));
            at
        });
        f(&mut fam.series[at].1);
    }

    /// Adds `by` to a counter (or gauge).
    pub fn add(&self, m: &Metric, l: &[(&'static str, &str)], by: f64) {
        self.with_series(m, l, |s| {
            if let Series::Value(v) = s {
                *v += by;
            }
        });
    }

    pub fn inc(&self, m: &Metric, l: &[(&'static str, &str)]) {
        self.add(m, l, 1.0);
    }

    pub fn set(&self, m: &Metric, l: &[(&'static str, &str)], value: f64) {
        self.with_series(m, l, |s| {
            if let Series::Value(v) = s {
                *v = value;
            }
        });
    }

    pub fn observe(&self, m: &Metric, l: &[(&'static str, &str)], value: f64) {
        let Kind::Histogram(bounds) = m.kind else {
            return self.set(m, l, value);
        };
        self.with_series(m, l, |s| {
            if let Series::Histogram { counts, sum, count } = s {
                // Per-bucket counts; made cumulative when rendered.
                if let Some(i) = bounds.iter().position(|b| value <= *b) {
                    counts[i] += 1;
                }
                *sum += value;
                *count += 1;
            }
        });
    }

    /// Replaces every series of a gauge at once (a label that disappeared must not linger).
    pub fn replace(&self, m: &Metric, series: Vec<(Vec<(&'static str, String)>, f64)>) {
        let mut fams = self.families.lock().expect("metrics lock poisoned");
        let sorted: BTreeMap<Labels, f64> = series.into_iter().collect();
        family(&mut fams, m).series = sorted
            .into_iter()
            .map(|(l, v)| (l, Series::Value(v)))
            .collect();
    }

    /// The current value of a counter or gauge series (tests and reports).
    pub fn value(&self, m: &Metric, l: &[(&'static str, &str)]) -> Option<f64> {
        let fams = self.families.lock().expect("metrics lock poisoned");
        let fam = fams.get(m.name)?;
        match &fam.series[fam.find(l).ok()?].1 {
            Series::Value(v) => Some(*v),
            Series::Histogram { count, .. } => Some(*count as f64),
        }
    }

    /// Adds a collector run before each scrape.
    pub fn on_scrape(&self, c: Collector) {
        self.collectors
            .lock()
            .expect("metrics lock poisoned")
            .push(c);
    }

    /// Runs the collectors, then renders the text exposition format (version 0.0.4).
    pub async fn scrape(&self) -> String {
        let collectors = self
            .collectors
            .lock()
            .expect("metrics lock poisoned")
            .clone();
        for c in collectors {
            c().await;
        }
        self.render()
    }

    /// The text exposition format, without running collectors.
    pub fn render(&self) -> String {
        let fams = self.families.lock().expect("metrics lock poisoned");
        let mut out = String::new();
        for fam in fams.values() {
            let m = &fam.metric;
            let kind = match m.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram(_) => "histogram",
            };
            let _ = writeln!(out, "# HELP {} {}", m.name, escape_help(m.help));
            let _ = writeln!(out, "# TYPE {} {kind}", m.name);
            for (l, s) in &fam.series {
                match s {
                    Series::Value(v) => {
                        let _ = writeln!(out, "{}{} {}", m.name, fmt_labels(l, None), num(*v));
                    }
                    Series::Histogram { counts, sum, count } => {
                        let Kind::Histogram(bounds) = m.kind else {
                            continue;
                        };
                        let mut acc = 0;
                        for (b, c) in bounds.iter().zip(counts) {
                            acc += c;
                            let le = num(*b);
                            let _ = writeln!(
                                out,
                                "{}_bucket{} {acc}",
                                m.name,
                                fmt_labels(l, Some(&le))
                            );
                        }
                        let _ = writeln!(
                            out,
                            "{}_bucket{} {count}",
                            m.name,
                            fmt_labels(l, Some("+Inf"))
                        );
                        let _ =
                            writeln!(out, "{}_sum{} {}", m.name, fmt_labels(l, None), num(*sum));
                        let _ = writeln!(out, "{}_count{} {count}", m.name, fmt_labels(l, None));
                    }
                }
            }
        }
        out
    }
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn fmt_labels(l: &Labels, le: Option<&str>) -> String {
    if l.is_empty() && le.is_none() {
        return String::new();
    }
    let mut parts: Vec<String> = l
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    format!("{{{}}}", parts.join(","))
}

/// Accepts connections on `listener` until `shutdown`, handing each to `serve` on its own task.
/// A failed accept (out of file descriptors, say) is logged under `what` and retried after a
/// short pause instead of ending the loop.
pub async fn accept_until<F, Fut>(
    what: &'static str,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    serve: F,
) where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::spawn(serve(stream));
    }
}

/// Serves `GET /metrics` (HTTP/1.1, one request per connection) on `listener` until `shutdown`.
pub async fn serve_metrics(
    registry: Arc<Registry>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    accept_until("metrics endpoint", listener, shutdown, move |stream| {
        let registry = registry.clone();
        async move {
            if let Err(e) = answer(&registry, stream).await {
                tracing::debug!(error = %e, "metrics endpoint: connection failed");
            }
        }
    })
    .await
}

async fn answer(registry: &Registry, mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // The request head only; a scraper sends no body with GET.
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > 16 * 1024 {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(head, Ok(Ok(()))) {
        return Ok(());
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            registry.scrape().await,
        ),
        ("GET", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "tandem metrics: GET /metrics\n".to_string(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: try /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET is supported\n".to_string(),
        ),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::catalogue::*;
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_histograms() {
        let r = Registry::new();
        r.register(&[HF_FAILOVERS]);
        r.inc(&RPC_REQUESTS, &[("rpc", "/a.B/C"), ("code", "OK")]);
        r.inc(&RPC_REQUESTS, &[("rpc", "/a.B/C"), ("code", "OK")]);
        r.set(&ANN_SERVING_VERSION, &[("model", "m\"x")], 3.0);
        r.observe(&RPC_DURATION, &[("rpc", "/a.B/C")], 0.0007);
        r.observe(&RPC_DURATION, &[("rpc", "/a.B/C")], 9.0);
        let text = r.render();
        assert!(text.contains("# TYPE tandem_homefeed_failovers_total counter"));
        assert!(text.contains("tandem_rpc_requests_total{rpc=\"/a.B/C\",code=\"OK\"} 2\n"));
        assert!(text.contains("tandem_ann_serving_version{model=\"m\\\"x\"} 3\n"));
        assert!(
            text.contains("tandem_rpc_duration_seconds_bucket{rpc=\"/a.B/C\",le=\"0.0005\"} 0\n")
        );
        assert!(
            text.contains("tandem_rpc_duration_seconds_bucket{rpc=\"/a.B/C\",le=\"0.001\"} 1\n")
        );
        assert!(text.contains("tandem_rpc_duration_seconds_bucket{rpc=\"/a.B/C\",le=\"2.5\"} 1\n"));
        assert!(text.contains("tandem_rpc_duration_seconds_bucket{rpc=\"/a.B/C\",le=\"+Inf\"} 2\n"));
        assert!(text.contains("tandem_rpc_duration_seconds_count{rpc=\"/a.B/C\"} 2\n"));
    }

    #[test]
    fn replace_drops_series_that_disappeared() {
        let r = Registry::new();
        r.replace(
            &HF_HOSTS_PER_VERSION,
            vec![
                (vec![("version", "v1".to_string())], 2.0),
                (vec![("version", "v2".to_string())], 1.0),
            ],
        );
        r.replace(
            &HF_HOSTS_PER_VERSION,
            vec![(vec![("version", "v2".to_string())], 3.0)],
        );
        assert_eq!(r.value(&HF_HOSTS_PER_VERSION, &[("version", "v1")]), None);
        assert_eq!(
            r.value(&HF_HOSTS_PER_VERSION, &[("version", "v2")]),
            Some(3.0)
        );
    }

    #[test]
    fn series_updated_in_any_order_stay_distinct_and_render_sorted() {
        let r = Registry::new();
        let codes = [
            "UNAVAILABLE",
            "OK",
            "NOT_FOUND",
            "OK",
            "ABORTED",
            "OK",
            "NOT_FOUND",
        ];
        for (k, code) in codes.iter().enumerate() {
            let rpc = if k % 2 == 0 { "/b" } else { "/a" };
            r.inc(&RPC_REQUESTS, &[("rpc", rpc), ("code", code)]);
        }
        let count = |rpc, code| r.value(&RPC_REQUESTS, &[("rpc", rpc), ("code", code)]);
        assert_eq!(count("/a", "OK"), Some(3.0));
        assert_eq!(count("/b", "NOT_FOUND"), Some(2.0));
        assert_eq!(count("/b", "UNAVAILABLE"), Some(1.0));
        assert_eq!(count("/b", "ABORTED"), Some(1.0));
        assert_eq!(count("/a", "ABORTED"), None);
        // A prefix of a series' labels is another series.
        assert_eq!(r.value(&RPC_REQUESTS, &[("rpc", "/a")]), None);
        let text = r.render();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("tandem_rpc_requests_total{"))
            .collect();
        let mut sorted = lines.clone();
        sorted.sort();
        assert_eq!(lines, sorted);
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn catalogue_names_are_unique_and_valid() {
        let mut seen = std::collections::HashSet::new();
        for m in ALL {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("tandem_"));
            assert!(m
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()));
            if m.kind == Kind::Counter {
                assert!(m.name.ends_with("_total"), "{}", m.name);
            }
        }
    }

    #[tokio::test]
    async fn the_endpoint_answers_get_metrics_and_404_elsewhere() {
        let r = Registry::new();
        r.inc(&HF_FAILOVERS, &[]);
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let c = calls.clone();
        r.on_scrape(Arc::new(move || {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async {})
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_metrics(r, listener, async {
            let _ = rx.await;
        }));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("tandem_homefeed_failovers_total 1\n"));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        tx.send(()).unwrap();
        server.await.unwrap();
    }
}
