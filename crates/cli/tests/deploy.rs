//! The deploy manifests stay true to the binary: every Kubernetes manifest and the compose file
//! parse, every flag a container passes exists in that subcommand's `--help`, and every port a
//! container listens on is the port its Service, probe and peers use.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

/// Every `args`/`command` list of a container anywhere in `v`.
fn arg_lists(v: &Value, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                if matches!(k.as_str(), Some("args" | "command")) {
                    if let Value::Sequence(s) = v {
                        out.push(
                            s.iter()
                                .filter_map(|x| x.as_str().map(String::from))
                                .collect(),
                        );
                        continue;
                    }
                }
                arg_lists(v, out);
            }
        }
        Value::Sequence(s) => s.iter().for_each(|v| arg_lists(v, out)),
        _ => {}
    }
}

/// Every value under a key named `key`, anywhere in `v`.
fn values_of(v: &Value, key: &str, out: &mut Vec<Value>) {
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                if k.as_str() == Some(key) {
                    out.push(v.clone());
                }
                values_of(v, key, out);
            }
        }
        Value::Sequence(s) => s.iter().for_each(|v| values_of(v, key, out)),
        _ => {}
    }
}

fn help(sub: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(sub)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "tandem {sub:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// The ports one container's arguments name: `--listen` (gRPC) and `--metrics-listen`.
#[derive(Default)]
struct Listens {
    grpc: Option<u16>,
    metrics: Option<u16>,
}

/// Checks one container's arguments against the CLI; returns the ports it listens on.
fn check_args(args: &[String], origin: &str) -> Listens {
    let sub: Vec<String> = args
        .iter()
        .take_while(|a| !a.starts_with("--"))
        .cloned()
        .collect();
    assert!(!sub.is_empty(), "{origin}: no subcommand in {args:?}");
    let text = help(&sub);
    let mut listen = Listens::default();
    for (i, a) in args.iter().enumerate() {
        if let Some(flag) = a.strip_prefix("--") {
            assert!(
                text.contains(&format!("--{flag} ")) || text.contains(&format!("--{flag}\n")),
                "{origin}: `tandem {}` has no --{flag}",
                sub.join(" ")
            );
            let port = || args[i + 1].rsplit(':').next().and_then(|p| p.parse().ok());
            match flag {
                "listen" => listen.grpc = port(),
                "metrics-listen" => listen.metrics = port(),
                _ => {}
            }
        }
    }
    listen
}

#[test]
fn kubernetes_manifests_parse_and_name_only_real_flags_and_consistent_ports() {
    let dir = repo().join("deploy/k8s");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    let mut kinds = BTreeSet::new();
    let mut listening = BTreeSet::new();
    let mut referenced = BTreeSet::new();
    let mut metrics = BTreeSet::new();
    for f in &files {
        for doc in docs(f) {
            if let Some(k) = doc["kind"].as_str() {
                kinds.insert(k.to_string());
            }
            let mut lists = Vec::new();
            arg_lists(&doc, &mut lists);
            for args in lists {
                let origin = f.display().to_string();
                let listens = check_args(&args, &origin);
                if let Some(port) = listens.grpc {
                    listening.insert(port);
                    let mut ports = Vec::new();
                    values_of(&doc, "containerPort", &mut ports);
                    values_of(&doc, "port", &mut ports);
                    values_of(&doc, "targetPort", &mut ports);
                    let declared: BTreeSet<u64> = ports.iter().filter_map(|p| p.as_u64()).collect();
                    let mut wanted = BTreeSet::from([port as u64]);
                    wanted.extend(listens.metrics.map(u64::from));
                    assert_eq!(
                        declared, wanted,
                        "{origin}: declared ports vs --listen/--metrics-listen"
                    );
                    metrics.extend(listens.metrics);
                }
                for a in &args {
                    for url in a.split(',').filter(|u| u.starts_with("http://")) {
                        let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
                        referenced.insert(port);
                    }
                }
            }
        }
    }
    for k in [
        "StatefulSet",
        "Deployment",
        "Service",
        "ConfigMap",
        "CronJob",
        "Job",
        "PersistentVolumeClaim",
    ] {
        assert!(kinds.contains(k), "no {k} in deploy/k8s (have {kinds:?})");
    }
    assert_eq!(listening, BTreeSet::from([7101, 7201, 7301]));
    assert_eq!(
        metrics,
        BTreeSet::from([9101, 9201, 9301]),
        "every service exposes its metrics"
    );
    assert!(
        referenced.is_subset(&listening),
        "{referenced:?} vs {listening:?}"
    );
    // One ANN StatefulSet per shard, at least 2 replicas each, and the orchestrator and the
    // retrainer list every one of their pods.
    let ann = docs(&dir.join("ann.yaml"));
    let mut pods = Vec::new();
    let mut shards = BTreeSet::new();
    for d in ann.iter().filter(|d| d["kind"] == "StatefulSet") {
        let name = d["metadata"]["name"].as_str().unwrap();
        let mut lists = Vec::new();
        arg_lists(d, &mut lists);
        let args = &lists[0];
        let at = args.iter().position(|a| a == "--shard").expect("--shard");
        shards.insert(args[at + 1].clone());
        let replicas = d["spec"]["replicas"].as_u64().unwrap();
        assert!(replicas >= 2, "{name}: {replicas} replicas");
        pods.extend((0..replicas).map(|r| format!("http://{name}-{r}.{name}:7101")));
    }
    assert_eq!(shards, BTreeSet::from(["0".to_string(), "1".to_string()]));
    for f in ["homefeed.yaml", "retrain.yaml"] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        for pod in &pods {
            assert!(text.contains(pod.as_str()), "{f} does not list {pod}");
        }
    }
}

#[test]
fn the_compose_file_parses_and_names_only_real_flags() {
    let doc = &docs(&repo().join("docker-compose.yml"))[0];
    let services = doc["services"].as_mapping().unwrap();
    for name in [
        "nats",
        "bootstrap",
        "user-tower-0",
        "user-tower-1",
        "ann-0",
        "ann-1",
        "ann-2",
        "ann-3",
        "homefeed",
        "dashboard",
        "retrainer",
    ] {
        assert!(services.contains_key(name), "compose has no {name}");
    }
    // 2 shards × 2 replicas: host i serves shard i mod 2, and the bootstrap splits v1 in 2.
    for i in 0..4 {
        let env = &services[format!("ann-{i}").as_str()]["environment"];
        assert_eq!(
            env["TANDEM_SHARD"].as_str(),
            Some((i % 2).to_string().as_str()),
            "ann-{i}: {env:?}"
        );
    }
    let boot: Vec<&str> = services["bootstrap"]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(boot.windows(2).any(|w| w == ["--shards", "2"]), "{boot:?}");
    let mut lists = Vec::new();
    arg_lists(doc, &mut lists);
    for args in lists
        .iter()
        .filter(|a| a.first().is_some_and(|s| s != "CMD"))
    {
        check_args(args, "docker-compose.yml");
    }
}

#[test]
fn every_exported_metric_is_documented_in_the_readme() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for m in tandem_telemetry::catalogue::ALL {
        assert!(
            readme.contains(&format!("| `{}` |", m.name)),
            "README's metrics table lacks {}",
            m.name
        );
    }
}

/// Hardening (#14, item 6): no manifest ships a usable admin secret. Compose generates one at
/// bootstrap into the shared volume; Kubernetes needs a Secret the operator creates.
#[test]
fn no_manifest_ships_an_admin_token() {
    let mut files = vec![repo().join("docker-compose.yml")];
    for e in std::fs::read_dir(repo().join("deploy/k8s")).unwrap() {
        files.push(e.unwrap().path());
    }
    for f in &files {
        for doc in docs(f) {
            let mut tokens = Vec::new();
            values_of(&doc, "TANDEM_ADMIN_TOKEN", &mut tokens);
            values_of(&doc, "--admin-token", &mut tokens);
            assert!(
                tokens.is_empty(),
                "{} sets an admin token: {tokens:?}",
                f.display()
            );
            let mut kinds = Vec::new();
            values_of(&doc, "kind", &mut kinds);
            assert!(
                !kinds.iter().any(|k| k.as_str() == Some("Secret")),
                "{} ships a Secret",
                f.display()
            );
        }
    }
    let compose = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    assert!(compose.contains("TANDEM_ADMIN_TOKEN_FILE: /artifacts/secrets/admin-token"));
    for args in {
        let mut l = Vec::new();
        arg_lists(&docs(&repo().join("docker-compose.yml"))[0], &mut l);
        l
    } {
        assert!(!args.iter().any(|a| a == "--admin-token"), "{args:?}");
    }
}
