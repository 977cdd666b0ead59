//! Helpers the CLI's integration tests share: running `tandem`, spawning services as child
//! processes, small trained stores.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .output()
        .expect("run tandem")
}

pub fn ok(args: &[&str]) -> String {
    let out = tandem(args);
    assert!(
        out.status.success(),
        "tandem {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Asserts a failure with exactly one line on stderr containing `needle`.
pub fn fails_with(args: &[&str], needle: &str) {
    let out = tandem(args);
    assert!(!out.status.success(), "tandem {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected, got: {err}"
    );
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub fn synth(dir: &Path, format: &str) -> PathBuf {
    let out = dir.join(format!("data-{format}"));
    let json = ok(&[
        "synth",
        "--out",
        p(&out),
        "--users",
        "300",
        "--items",
        "400",
        "--events",
        "20000",
        "--format",
        format,
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["events"], 20000);
    out
}

pub const SMALL: &[&str] = &[
    "--epochs",
    "2",
    "--dim",
    "16",
    "--id-dim",
    "16",
    "--hidden",
    "32",
    "--history",
    "10",
    "--batch-size",
    "256",
    "--quiet",
];

/// Trains a small model on all of `events` (no validation) into `artifacts`.
pub fn train_small(events: &Path, artifacts: &Path) {
    train_small_with(events, artifacts, &[]);
}

/// [`train_small`] with extra `tandem train` flags (e.g. `--seed 2`).
pub fn train_small_with(events: &Path, artifacts: &Path, extra: &[&str]) {
    let mut args = vec![
        "train",
        "--events",
        p(events),
        "--out",
        p(artifacts),
        "--protocol",
        "none",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(SMALL);
    ok(&args);
}

/// A `tandem serve …` child process, killed when dropped (also when a test panics).
pub struct Server(pub std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tandem serve …` on port 0 and returns it with its address (from its first line).
pub fn spawn_server(args: &[&str]) -> (Server, String) {
    let (server, addr, _) = spawn_service(args, &[]);
    (server, addr)
}

/// Polls a `tandem` command until its JSON output satisfies `pred` (bounded).
pub fn poll_json(args: &[&str], pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    for _ in 0..400 {
        let out = tandem(args);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if pred(&v) {
                return v;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("condition never held for tandem {args:?}");
}

/// Trains v1 and v2 (two seeds) on a small synthetic log and indexes both; returns the store.
pub fn two_indexed_versions(dir: &Path) -> PathBuf {
    two_indexed_versions_with(dir, &[])
}

/// [`two_indexed_versions`] with extra `tandem index` flags (e.g. `--shards 2`).
pub fn two_indexed_versions_with(dir: &Path, index_flags: &[&str]) -> PathBuf {
    let data = synth(dir, "csv");
    let events = data.join("events.csv");
    let artifacts = dir.join("a");
    for seed in ["1", "2"] {
        train_small_with(&events, &artifacts, &["--seed", seed]);
    }
    for v in ["v1", "v2"] {
        let model = artifacts.join("models/tandem").join(v);
        let mut args = vec!["index", "--model", p(&model), "--out", p(&artifacts)];
        args.extend_from_slice(index_flags);
        ok(&args);
    }
    artifacts
}

/// A `tandem serve …` child with extra environment; returns it, its gRPC address and, when it
/// was started with `--metrics-listen`, its metrics address (its second stderr line).
pub fn spawn_service(args: &[&str], env: &[(&str, &str)]) -> (Server, String, Option<String>) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let addr = format!("http://{}", line.trim().rsplit(' ').next().unwrap());
    let metrics = args.contains(&"--metrics-listen").then(|| {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("metrics on "), "{line}");
        line.trim().trim_start_matches("metrics on ").to_string()
    });
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    (Server(child), addr, metrics)
}

/// `GET url` over a plain socket (the metrics endpoint speaks HTTP/1.1).
pub fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    write!(s, "GET /{path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The value of one sample in a Prometheus exposition (`name{labels}` exactly as rendered).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `tandem serve user-tower` on port 0 over `artifacts`, its engagement in `events` (a
/// directory or `nats://…`), polling the registry every 50 ms, plus `extra` flags.
pub fn serve_user_tower(
    artifacts: &Path,
    events: &str,
    extra: &[&str],
) -> (Server, String, Option<String>) {
    let mut args = vec![
        "serve",
        "user-tower",
        "--artifacts",
        p(artifacts),
        "--listen",
        "127.0.0.1:0",
        "--events",
        events,
        "--poll-ms",
        "50",
    ];
    args.extend_from_slice(extra);
    spawn_service(&args, &[])
}

/// `tandem serve ann` on port 0 over `artifacts` with admin token `t`, plus `extra` flags.
pub fn serve_ann(artifacts: &Path, extra: &[&str]) -> (Server, String) {
    let mut args = vec![
        "serve",
        "ann",
        "--artifacts",
        p(artifacts),
        "--listen",
        "127.0.0.1:0",
        "--admin-token",
        "t",
    ];
    args.extend_from_slice(extra);
    spawn_server(&args)
}
