//! The live dashboard, seen through a real browser: a small cluster as child processes, headless
//! Chromium rendering `tandem serve dashboard`, and assertions on the rendered DOM while a
//! rollout moves the hosts from v1 to v2.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Debian's headless Chromium (`chromium`, or the smaller `chromium-headless-shell`).
fn chromium() -> PathBuf {
    let names = [
        "chromium",
        "chromium-headless-shell",
        "chromium-browser",
        "google-chrome",
    ];
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/lib/chromium")]) {
        for n in names {
            let c = dir.join(n);
            if c.is_file() {
                return c;
            }
        }
    }
    panic!(
        "headless Chromium not found on PATH: apt-get install -y chromium-headless-shell \
         (or chromium); .ci/run installs it"
    );
}

/// Renders `url` in headless Chromium and returns the DOM after the page's scripts ran;
/// with `screenshot`, also saves a PNG of the page there.
fn render(url: &str, profile: &Path, screenshot: Option<&Path>) -> String {
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=1280,1400",
        // Timers run in virtual time, but the page's fetches are real: 3 s of page time is
        // several refreshes of a fleet that was already sampled.
        "--virtual-time-budget=3000",
    ]);
    cmd.arg(format!("--user-data-dir={}", profile.display()));
    match screenshot {
        Some(png) => cmd.arg(format!("--screenshot={}", png.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd.arg(url).output().expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `GET` on the dashboard (it keeps connections alive, so ask it to close).
fn get(addr: &str, path: &str) -> (u16, serde_json::Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or_default())
}

/// Polls `/api/state` until `pred` holds for its view (bounded).
fn wait_state(addr: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, v) = get(addr, "/api/state");
        assert_eq!(status, 200);
        if v["ready"] == true && pred(&v["view"]) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard never showed the expected state: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `data-version` of the host row for `host` in the rendered DOM.
fn host_cell(dom: &str, host: &str) -> String {
    let key = format!("data-host=\"{host}\" data-version=\"");
    let at = dom
        .find(&key)
        .unwrap_or_else(|| panic!("no row for {host} in the page"));
    let rest = &dom[at + key.len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

fn attr<'a>(dom: &'a str, id: &str, name: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let tag = &dom[at..at + dom[at..].find('>').unwrap()];
    let key = format!("{name}=\"");
    let v = &tag[tag
        .find(&key)
        .unwrap_or_else(|| panic!("#{id} has no {name}: {tag}"))
        + key.len()..];
    &v[..v.find('"').unwrap()]
}

#[test]
fn the_dashboard_shows_a_rollout_from_v1_to_v2_in_a_real_browser() {
    let browser = chromium();
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), "csv");
    let events = data.join("events.csv");
    let artifacts = dir.path().join("a");

    // v1 through one retrain cycle (so the history has a real record: gate, metrics), on the
    // older part of the log; v2 trained and indexed by hand on all of it.
    let text = std::fs::read_to_string(&events).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let older = dir.path().join("older.csv");
    std::fs::write(&older, lines[..lines.len() * 2 / 3].join("\n") + "\n").unwrap();
    let cfg = dir.path().join("retrain.toml");
    std::fs::write(
        &cfg,
        "[model]\ndim = 16\nid_dim = 16\nhidden = 32\nhistory = 10\n[train]\nepochs = 2\nbatch_size = 256\n",
    )
    .unwrap();
    let cycle: serde_json::Value = serde_json::from_str(&ok(&[
        "retrain",
        "--once",
        "--events",
        p(&older),
        "--artifacts",
        p(&artifacts),
        "--config",
        p(&cfg),
        "--json",
    ]))
    .unwrap();
    assert_eq!(cycle["version"], "v1", "{cycle}");
    train_small_with(&events, &artifacts, &["--seed", "2"]);
    let v2 = artifacts.join("models/tandem/v2");
    ok(&["index", "--model", p(&v2), "--out", p(&artifacts)]);

    let (_ut, ut, _) = serve_user_tower(&artifacts, p(&dir.path().join("log")), &[]);
    let hosts: Vec<(Server, String)> = (0..2)
        .map(|_| serve_ann(&artifacts, &["--version", "v1"]))
        .collect();
    let host_list = format!("{},{}", hosts[0].1, hosts[1].1);
    let (_hf, hf, hf_metrics) = spawn_service(
        &[
            "serve",
            "homefeed",
            "--ann-hosts",
            &host_list,
            "--user-tower",
            &ut,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--metadata-ttl-ms",
            "100",
        ],
        &[],
    );
    let (_dash, dash, _) = spawn_service(
        &[
            "serve",
            "dashboard",
            "--hosts",
            &host_list,
            "--user-tower",
            &ut,
            "--homefeed",
            &hf,
            "--homefeed-metrics",
            &hf_metrics.unwrap(),
            "--artifacts",
            p(&artifacts),
            "--listen",
            "127.0.0.1:0",
            "--interval-ms",
            "200",
        ],
        &[],
    );
    let dash = dash.trim_start_matches("http://").to_string();

    // Traffic through the orchestrator, so the answers-per-version chart has something to draw.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, hf) = (stop.clone(), hf.clone());
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let user = format!("u{}", n % 50);
                let _ = tandem(&[
                    "call",
                    "homefeed",
                    "candidates",
                    "--addr",
                    &hf,
                    "--user",
                    &user,
                    "--k",
                    "10",
                ]);
                n += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let page = format!("http://{dash}/");
    let profile = dir.path().join("chromium-profile");
    let on = |want: &[&str]| {
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        move |v: &serde_json::Value| {
            let got: Vec<String> = v["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h["model_version"].as_str().unwrap_or("").to_string())
                .collect();
            got == want && v["user_tower"]["versions"].as_array().unwrap().len() == 2
        }
    };

    // Before: both hosts on v1, one version live.
    wait_state(&dash, on(&["v1", "v1"]));
    let dom = render(&page, &profile, None);
    assert_eq!(host_cell(&dom, &hosts[0].1), "v1");
    assert_eq!(host_cell(&dom, &hosts[1].1), "v1");
    assert_eq!(attr(&dom, "versions-live", "data-live"), "1");
    assert_eq!(attr(&dom, "rollout", "data-state"), "steady");
    assert!(
        dom.contains("data-outcome=\"published\""),
        "retrain history row missing"
    );

    // Halfway: the first host moved, two versions live, a rollout in progress.
    let roll = |host: &str| {
        ok(&[
            "rollout",
            "--to",
            "v2",
            "--hosts",
            host,
            "--user-tower",
            &ut,
            "--artifacts",
            p(&artifacts),
            "--admin-token",
            "t",
            "--json",
        ])
    };
    roll(&hosts[0].1);
    wait_state(&dash, on(&["v2", "v1"]));
    let dom = render(&page, &profile, None);
    assert_eq!(host_cell(&dom, &hosts[0].1), "v2");
    assert_eq!(host_cell(&dom, &hosts[1].1), "v1");
    assert_eq!(attr(&dom, "versions-live", "data-live"), "2");
    assert_eq!(attr(&dom, "rollout", "data-state"), "rolling_out");

    // Done: both on v2, back to one version live; the "try a user" box answers from v2.
    roll(&hosts[1].1);
    let state = wait_state(&dash, on(&["v2", "v2"]));
    // Let the answers chart see traffic on v2 before the screenshot.
    std::thread::sleep(Duration::from_millis(1500));
    let dom = render(&format!("{page}?user=u1"), &profile, None);
    assert_eq!(host_cell(&dom, &hosts[0].1), "v2");
    assert_eq!(host_cell(&dom, &hosts[1].1), "v2");
    assert_eq!(attr(&dom, "versions-live", "data-live"), "1");
    assert_eq!(attr(&dom, "rollout", "data-state"), "steady");
    assert!(
        dom.contains("data-answer-version=\"v2\""),
        "the try-a-user box did not show an answer from v2"
    );
    let series = state["series"].as_array().unwrap();
    assert!(
        series.iter().any(|s| s["versions_live"] == 2)
            && series.iter().any(|s| s["versions_live"] == 1),
        "the series must hold the skew going 2 → 1"
    );
    // Answers per version from the orchestrator's counters: v1's before, v2's after.
    let (_, late) = get(&dash, "/api/state");
    let answered = &late["view"]["homefeed"]["answers_total"];
    assert!(
        answered["v1"].as_f64().unwrap_or(0.0) > 0.0
            && answered["v2"].as_f64().unwrap_or(0.0) > 0.0,
        "answers per version: {}",
        late["view"]["homefeed"]
    );
    assert!(
        late["series"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["answers_per_s"]["v2"].as_f64().unwrap_or(0.0) > 0.0),
        "no answer rate for v2 in the series"
    );

    let shot = dir.path().join("dashboard.png");
    render(&format!("{page}?user=u1"), &profile, Some(&shot));
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    eprintln!("screenshot: {} (via {})", shot.display(), browser.display());
    // `TANDEM_DASHBOARD_SCREENSHOT=docs/dashboard.png` keeps a copy (the README's picture).
    if let Some(keep) = std::env::var_os("TANDEM_DASHBOARD_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }

    // The API refuses what it does not serve, with a reason.
    let (status, body) = get(&dash, "/api/candidates?k=5");
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("user"));
    let (status, _) = get(&dash, "/api/candidates?user=u1&k=100000");
    assert_eq!(status, 400);

    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
}
