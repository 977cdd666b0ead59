//! The dashboard's HTTP side (HTTP/1.1, GET only):
//!
//! | path | answer |
//! | --- | --- |
//! | `/` | the page |
//! | `/api/state` | the newest [`crate::FleetView`] and the sample series |
//! | `/api/history` | the retrain history (last record of each of the last 50 cycles) |
//! | `/api/candidates?user=U&k=K` | one `GetCandidates` through the orchestrator |
//! | `/healthz` | `ok` |

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::Shared;

/// The page: markup, style and script in one file, nothing fetched from elsewhere.
const PAGE: &str = include_str!("page.html");

/// Cycles `/api/history` returns at most.
const HISTORY_CYCLES: usize = 50;

/// Largest `k` the "try a user" box asks for.
const MAX_K: i32 = 200;

pub(crate) async fn run(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    tandem_telemetry::accept_until("dashboard", listener, shutdown, move |stream| {
        let shared = shared.clone();
        async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "dashboard: connection ended with an error");
            }
        }
    })
    .await
}

type Answer = Response<Full<Bytes>>;

fn answer(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_str(content_type)
            .unwrap_or(hyper::header::HeaderValue::from_static("text/plain")),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Answer {
    answer(status, "application/json", v.to_string())
}

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    json(status, &serde_json::json!({ "error": message.into() }))
}

async fn route<B>(shared: &Shared, req: Request<B>) -> Answer {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "the dashboard is read-only: GET only",
        );
    }
    match req.uri().path() {
        "/" | "/index.html" => answer(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        "/api/state" => state(shared),
        "/api/history" => history(shared),
        "/api/candidates" => candidates(shared, req.uri().query().unwrap_or("")).await,
        "/healthz" => answer(StatusCode::OK, "text/plain", "ok\n"),
        other => error(StatusCode::NOT_FOUND, format!("no such page: {other}")),
    }
}

fn state(shared: &Shared) -> Answer {
    let live = shared.live.read().unwrap_or_else(|e| e.into_inner());
    json(
        StatusCode::OK,
        &serde_json::json!({
            "ready": live.view.is_some(),
            "interval_ms": shared.cfg.interval.as_millis() as u64,
            "view": live.view,
            "series": live.series,
        }),
    )
}

fn history(shared: &Shared) -> Answer {
    let h = tandem_retrain::History::for_model(&shared.cfg.artifacts, &shared.cfg.model);
    match h.cycles() {
        Ok(mut cycles) => {
            let skip = cycles.len().saturating_sub(HISTORY_CYCLES);
            cycles.drain(..skip);
            json(
                StatusCode::OK,
                &serde_json::json!({ "path": h.path(), "cycles": cycles }),
            )
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            tandem_types::error_chain(&e),
        ),
    }
}

async fn candidates(shared: &Shared, query: &str) -> Answer {
    let Some(client) = &shared.homefeed else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no orchestrator configured (start the dashboard with --homefeed URL)",
        );
    };
    let params = form(query);
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let user = get("user").unwrap_or("").trim();
    if user.is_empty() {
        return error(StatusCode::BAD_REQUEST, "give a user id: ?user=U");
    }
    let k = match get("k").map(str::parse::<i32>) {
        None => 20,
        Some(Ok(k)) if (1..=MAX_K).contains(&k) => k,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("k must be a whole number in 1..={MAX_K}"),
            )
        }
    };
    let exclude_seen = matches!(get("exclude_seen"), Some("1" | "true" | "on"));
    let started = Instant::now();
    match client
        .candidates(user, k, exclude_seen, Some(Duration::from_secs(5)))
        .await
    {
        Ok(a) => json(
            StatusCode::OK,
            &serde_json::json!({
                "user": user,
                "index_version": a.index_version,
                "embedding_version": a.embedding_version,
                "ann_host": a.ann_host,
                "attempts": a.attempts,
                "ms": started.elapsed().as_secs_f64() * 1e3,
                "items": a.items.iter().map(|(id, s)| serde_json::json!({"item_id": id, "score": s})).collect::<Vec<_>>(),
            }),
        ),
        Err(e) => error(StatusCode::BAD_GATEWAY, tandem_types::error_chain(&e)),
    }
}

/// `a=1&b=x%20y` as pairs, percent- and `+`-decoded (invalid escapes are kept as written).
fn form(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_decoded() {
        assert_eq!(
            form("user=u%201&k=5&x"),
            vec![
                ("user".into(), "u 1".into()),
                ("k".into(), "5".into()),
                ("x".into(), String::new())
            ]
        );
        assert_eq!(decode("a+b%2Fc%zz%4"), "a b/c%zz%4");
        assert_eq!(decode("%E2%9C%93"), "✓");
    }
}
