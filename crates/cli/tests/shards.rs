//! Sharded index versions (#17, first part): `tandem index --shards S` publishes one version as
//! S shards together; each ANN host serves one shard and says which.

mod common;

use std::collections::BTreeSet;

use common::*;

#[test]
fn a_sharded_version_splits_the_catalogue_and_each_host_serves_and_reports_its_shard() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), "csv");
    let artifacts = dir.path().join("a");
    train_small(&data.join("events.csv"), &artifacts);
    let model = artifacts.join("models/tandem/v1");
    let out: serde_json::Value = serde_json::from_str(&ok(&[
        "index",
        "--model",
        p(&model),
        "--out",
        p(&artifacts),
        "--shards",
        "2",
        "--events",
        p(&data.join("events.csv")),
        "--json",
    ]))
    .unwrap();
    assert_eq!(out["shards"], 2);
    let per: Vec<u64> = out["shard_items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(per.len(), 2);
    assert_eq!(per.iter().sum::<u64>(), out["items"].as_u64().unwrap());
    assert!(
        per.iter().all(|&n| n > 50),
        "a stable hash splits evenly enough: {per:?}"
    );
    // Merged recall of the per-shard answers against exact search over the whole catalogue.
    assert!(out["ann_recall_at_10"].as_f64().unwrap() > 0.9, "{out}");

    let mut seen = BTreeSet::new();
    for shard in 0..2u32 {
        let (_h, url) = serve_ann(&artifacts, &["--shard", &shard.to_string()]);
        let m = poll_json(
            &["call", "ann", "metadata", "--addr", &url, "--json"],
            |v| v["model_version"] == "v1",
        );
        assert_eq!(m["shard"], shard);
        assert_eq!(m["shard_count"], 2);
        assert_eq!(
            m["item_count"], per[shard as usize],
            "the host holds only its shard"
        );
        // Every answer of this host is an item of this shard, and no item is in two shards.
        let zero = vec!["0.125"; out["dim"].as_u64().unwrap() as usize].join(",");
        let found: serde_json::Value = serde_json::from_str(&ok(&[
            "call",
            "ann",
            "search",
            "--addr",
            &url,
            "--model-version",
            "v1",
            "--embedding",
            &zero,
            "--k",
            "1000",
            "--json",
        ]))
        .unwrap();
        let items: Vec<String> = found["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["item_id"].as_str().unwrap().to_string())
            .collect();
        assert!(!items.is_empty());
        for i in items {
            assert!(seen.insert(i.clone()), "{i} is served by two shards");
        }
    }

    // A host without --shard refuses the sharded version, saying why.
    let (_h, url) = serve_ann(&artifacts, &[]);
    let out = tandem(&[
        "call",
        "ann",
        "load",
        "--addr",
        &url,
        "--version",
        "v1",
        "--admin-token",
        "t",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an unsharded host loaded a sharded version"
    );
    assert!(err.contains("split into 2 shards"), "{err}");
    let out = tandem(&["call", "ann", "metadata", "--addr", &url, "--json"]);
    assert!(
        !out.status.success(),
        "an unsharded host serves a sharded version"
    );
}

/// 2 shards × 2 replicas under traffic through the orchestrator: a version missing a shard is
/// never chosen, a killed replica costs nothing, and no answer mixes versions.
#[test]
fn the_orchestrator_merges_shards_of_one_version_through_a_partial_rollout_and_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let artifacts = two_indexed_versions_with(dir.path(), &["--shards", "2"]);
    let host = |shard: &str| serve_ann(&artifacts, &["--shard", shard, "--version", "v1"]);
    let (s0a, s0a_url) = host("0");
    let (_s0b, s0b_url) = host("0");
    let (_s1a, s1a_url) = host("1");
    let (s1b, s1b_url) = host("1");
    let (_ut, ut_url, _) = serve_user_tower(&artifacts, p(&dir.path().join("log")), &[]);
    for url in [&s0a_url, &s0b_url, &s1a_url, &s1b_url] {
        poll_json(&["call", "ann", "metadata", "--addr", url, "--json"], |v| {
            v["model_version"] == "v1"
        });
    }
    poll_json(
        &[
            "call",
            "user-tower",
            "versions",
            "--addr",
            &ut_url,
            "--json",
        ],
        |v| v["versions"].as_array().is_some_and(|a| a.len() == 2),
    );
    let hosts = [&s0a_url, &s0b_url, &s1a_url, &s1b_url]
        .map(|s| s.as_str())
        .join(",");
    let (_hf, hf_url) = spawn_server(&[
        "serve",
        "homefeed",
        "--listen",
        "127.0.0.1:0",
        "--ann-hosts",
        &hosts,
        "--user-tower",
        &ut_url,
    ]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let load = |url: &str, v: &str| {
        ok(&[
            "call",
            "ann",
            "load",
            "--addr",
            url,
            "--version",
            v,
            "--admin-token",
            "t",
        ]);
    };
    let mut s0a = Some(s0a);
    let mut s1b = Some(s1b);
    rt.block_on(async {
        use std::sync::{Arc, Mutex};
        let hf = tandem_client::HomefeedClient::lazy(&hf_url, &Default::default()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while hf.candidates("u1", 10, false, None).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "no answer from the orchestrator"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // (index version, embedding version, items, hosts) of every answer; errors.
        let log = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..4 {
            let (hf, log, errors, stop) = (hf.clone(), log.clone(), errors.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut k = w;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    k += 4;
                    match hf
                        .candidates(&format!("u{}", k % 300), 10, false, None)
                        .await
                    {
                        Ok(a) => log.lock().unwrap().push((
                            a.index_version.to_string(),
                            a.embedding_version.to_string(),
                            a.items.len(),
                            a.ann_host,
                        )),
                        Err(e) => errors.lock().unwrap().push(e.to_string()),
                    }
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(800)).await;
        // v2 on one replica of shard 0 only: v2 has no replica on shard 1, so it is not chosen.
        tokio::task::block_in_place(|| load(&s0a_url, "v2"));
        let from = log.lock().unwrap().len();
        tokio::time::sleep(std::time::Duration::from_millis(800)).await;
        let partial: Vec<_> = log.lock().unwrap()[from..].to_vec();
        assert!(!partial.is_empty());
        assert!(
            partial.iter().all(|a| a.0 == "v1"),
            "v2 chosen without shard 1"
        );
        // `tandem status` shows versions × shards × replicas.
        let st = tokio::task::block_in_place(|| {
            ok(&[
                "status",
                "--hosts",
                &hosts,
                "--user-tower",
                &ut_url,
                "--artifacts",
                p(&artifacts),
                "--json",
            ])
        });
        let st: serde_json::Value = serde_json::from_str(&st).unwrap();
        assert_eq!(
            st["replicas_per_shard"],
            serde_json::json!({"v1": [1, 2], "v2": [1, 0]}),
            "{st}"
        );
        // Kill a v1 replica of shard 1 under traffic, then finish the rollout on shard 1.
        drop(s1b.take());
        tokio::time::sleep(std::time::Duration::from_millis(800)).await;
        tokio::task::block_in_place(|| load(&s1a_url, "v2"));
        tokio::time::sleep(std::time::Duration::from_millis(800)).await;
        drop(s0a.take());
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let log = log.lock().unwrap();
        let errors = errors.lock().unwrap();
        println!("{} answers, {} errors", log.len(), errors.len());
        assert!(log.len() > 50, "{}", log.len());
        for (iv, ev, n, hosts) in log.iter() {
            assert_eq!(iv, ev, "an answer mixed versions");
            assert_eq!(*n, 10);
            assert_eq!(
                hosts.split(',').count(),
                2,
                "one replica per shard: {hosts}"
            );
        }
        assert!(
            log.iter().any(|a| a.0 == "v2"),
            "v2 never answered once it had both shards"
        );
        // The last phase: shard 0 of v2 on s0a only, which was killed; v1 lost shard 1. No
        // version is fully covered any more: requests fail clearly, none is partial.
        if let Some(e) = errors.iter().find(|e| !e.contains("every shard")) {
            panic!("a request failed before coverage was lost: {e}");
        }
    });
}

/// The rolling upgrade, forced flip, rollback and kill over 2 shards × 2 replicas: the sync
/// mode never merges shard answers of another version than the embedding's and loses no
/// request; the merged recall is set beside an unsharded index's; the naive mode mixes.
#[test]
fn the_rollout_simulation_over_shards_keeps_every_merged_answer_on_one_version() {
    let out: serde_json::Value = serde_json::from_str(&ok(&[
        "sim",
        "rollout",
        "--shards",
        "2",
        "--replicas",
        "2",
        "--requests",
        "800",
        "--json",
    ]))
    .unwrap();
    assert_eq!(out["hosts"], 4);
    assert_eq!(out["shards"], 2);
    let sync = &out["modes"]["sync"];
    let naive = &out["modes"]["naive"];
    assert_eq!(sync["requests"], 800);
    assert_eq!(sync["errors"], 0, "{sync}");
    assert_eq!(sync["mismatched"], 0, "{sync}");
    assert_eq!(sync["forced_flips"], 1, "{sync}");
    let by = &sync["answers_by_index_version"];
    assert!(
        by["v1"].as_u64().unwrap() > 0 && by["v2"].as_u64().unwrap() > 0,
        "{sync}"
    );
    let (merged, whole) = (
        sync["recall_at_k"].as_f64().unwrap(),
        sync["unsharded_recall_at_k"].as_f64().unwrap(),
    );
    assert!(merged >= 0.9 && merged >= whole - 0.05, "{sync}");
    assert!(naive["mismatched"].as_u64().unwrap() > 0, "{naive}");
}
