//! `tandem bootstrap`: prepares an empty artifact store for a cluster (the docker-compose
//! one-shot): synthesises 14 days of drifting engagement ending now, writes all of it as the
//! user tower's event log, and trains, indexes and publishes v1 on the older half — so the first
//! `tandem retrain` has fresh events to learn from.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use tandem_data::synth::SynthConfig;
use tandem_model::config::{ModelConfig, TrainConfig};
use tandem_registry::{Registry, MODELS};
use tandem_sandbox::scenario::{drift, publish_trained, seed_event_log};
use tandem_types::ModelVersion;

use crate::args::print_json;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long, env = "TANDEM_ARTIFACTS", default_value = "artifacts")]
    pub artifacts: PathBuf,
    #[arg(long, env = "TANDEM_MODEL", default_value = "tandem")]
    pub model: String,
    #[arg(long, default_value_t = 2000)]
    pub users: usize,
    #[arg(long, default_value_t = 1500)]
    pub items: usize,
    #[arg(long, default_value_t = 60_000)]
    pub events: usize,
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let started = Instant::now();
    let reg = Registry::open(&a.artifacts);
    if !reg.list(MODELS, &a.model)?.is_empty() {
        // Idempotent for `docker compose up` after a restart: an initialised store is kept.
        let out = serde_json::json!({"artifacts": a.artifacts, "initialised": false, "reason": "already has model versions"});
        if a.json {
            return print_json(&out);
        }
        eprintln!(
            "{}: already has versions of {}; nothing to do",
            a.artifacts.display(),
            a.model
        );
        return Ok(());
    }
    if a.users == 0 || a.items == 0 || a.events < 1000 {
        bail!("--users and --items must be positive and --events at least 1000");
    }
    let d = drift(
        &SynthConfig {
            users: a.users,
            items: a.items,
            events: a.events,
            seed: a.seed,
            days: 14,
            ..Default::default()
        },
        0.5,
    );
    let mut all = d.seed.clone();
    for f in &d.fresh {
        all.push(&f.user, &f.item, f.ts, 1.0);
    }
    std::fs::create_dir_all(&a.artifacts)?;
    seed_event_log(&a.artifacts, &all);
    let mcfg = ModelConfig::default();
    let tcfg = TrainConfig {
        epochs: a.epochs,
        ..Default::default()
    };
    let (_, report) = publish_trained(
        &a.artifacts,
        &a.model,
        ModelVersion(1),
        &d.seed,
        &mcfg,
        &tcfg,
    );
    let out = serde_json::json!({
        "artifacts": a.artifacts,
        "initialised": true,
        "event_log": a.artifacts.join("events"),
        "events": all.len(),
        "v1_trained_on": d.seed.len(),
        "validation": report.validation,
        "seconds": started.elapsed().as_secs_f64(),
    });
    if a.json {
        return print_json(&out);
    }
    eprintln!(
        "initialised {}: {} events in the event log, v1 trained on the older {} ({:.1}s)",
        a.artifacts.display(),
        all.len(),
        d.seed.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
