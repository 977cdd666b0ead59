//! `tandem bootstrap`: prepares an empty artifact store for a cluster (the docker-compose
//! one-shot): synthesises 14 days of drifting engagement ending now, writes all of it as the
//! user tower's event log, and trains, indexes and publishes v1 on the older half — so the first
//! `tandem retrain` has fresh events to learn from.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tandem_data::drift::{drift, seed_event_log};
use tandem_data::synth::SynthConfig;
use tandem_data::Protocol;
use tandem_index::HnswParams;
use tandem_model::config::{ModelConfig, TrainConfig};
use tandem_model::train::TrainInput;
use tandem_pipeline::{train_and_publish, IndexSpec, TrainJob};
use tandem_registry::Registry;
use tandem_types::{ModelVersion, MODELS};

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
    /// Where the synthetic engagement goes: `nats://HOST:4222` seeds the NATS JetStream stream
    /// (unless it already holds messages); otherwise `<artifacts>/events`.
    #[arg(long, env = "TANDEM_EVENT_LOG")]
    pub event_log: Option<String>,
    #[command(flatten)]
    pub nats: crate::args::NatsArgs,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Split v1's index into this many shards (hosts then serve one each with `--shard`).
    #[arg(long, env = "TANDEM_SHARDS", default_value_t = 1)]
    pub shards: u32,
    /// Make sure FILE holds an admin token: a random one (32 bytes from the OS, hex) is written,
    /// readable by its owner only, when the file does not exist yet.
    #[arg(long, env = "TANDEM_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// Writes a fresh random token to `path` unless it exists; true when it wrote one.
fn ensure_admin_token(path: &Path) -> Result<bool> {
    if path.exists() {
        tandem_server::AdminToken::from_file(path)?;
        return Ok(false);
    }
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .context("reading /dev/urandom for the admin token")?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| tmp.display().to_string())?;
        f.write_all(token.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| path.display().to_string())?;
    Ok(true)
}

/// Publishes `log` (in time order) to the engagement stream, unless the stream already holds
/// messages (a bootstrap that crashed after seeding must not seed twice). Waits up to a minute
/// for the server (it may be starting alongside).
fn seed_stream(opts: &tandem_stream::NatsOptions, log: &tandem_data::EventLog) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let stream = tandem_stream::EventStream::connect(opts).await?;
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        let tail = loop {
            match stream.ensure().await {
                Ok(_) => break stream.tail().await?,
                Err(e) if Instant::now() < deadline => {
                    tracing::info!(error = %e, "waiting for NATS");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        if tail.messages > 0 {
            eprintln!(
                "stream {} already holds {} messages; not seeding it again",
                opts.stream, tail.messages
            );
            return Ok(());
        }
        let order = log.time_order();
        for chunk in order.chunks(5_000) {
            let events: Vec<tandem_data::events::Event> = chunk
                .iter()
                .map(|&e| {
                    let e = e as usize;
                    tandem_data::events::Event {
                        user: log.users.name(log.user[e]).to_string(),
                        item: log.items.name(log.item[e]).to_string(),
                        ts: log.ts[e],
                        action: "view".into(),
                        weight: log.weight[e],
                    }
                })
                .collect();
            stream.publish(&events).await?;
        }
        anyhow::Ok(())
    })
}

pub fn run(a: Args) -> Result<()> {
    let started = Instant::now();
    if let Some(path) = &a.admin_token_file {
        if ensure_admin_token(path)? && !a.json {
            eprintln!("wrote a new admin token to {}", path.display());
        }
    }
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
    let all = d.all();
    let event_log = match a.event_log.as_deref() {
        Some(url) if tandem_stream::is_nats_url(url) => {
            seed_stream(&a.nats.options(url, "tandem-bootstrap"), &all)?;
            url.to_string()
        }
        Some(dir) => {
            seed_event_log(Path::new(dir), &all)?;
            dir.to_string()
        }
        None => {
            let dir = a.artifacts.join("events");
            seed_event_log(&dir, &all)?;
            dir.display().to_string()
        }
    };
    let mcfg = ModelConfig::default();
    let tcfg = TrainConfig {
        epochs: a.epochs,
        ..Default::default()
    };
    let v1 = train_and_publish(TrainJob {
        root: &a.artifacts,
        name: &a.model,
        version: Some(ModelVersion(1)),
        input: TrainInput {
            log: &d.seed,
            user_features: None,
            item_features: None,
            validation: Some(Protocol::Global),
        },
        model: &mcfg,
        train: &tcfg,
        extra: serde_json::json!({}),
        index: Some(IndexSpec {
            params: HnswParams::default(),
            recall_queries: 500,
            query_log: &d.seed,
            shards: a.shards,
        }),
        progress: false,
    })?;
    let report = v1.report;
    let out = serde_json::json!({
        "artifacts": a.artifacts,
        "initialised": true,
        "event_log": event_log,
        "events": all.len(),
        "v1_trained_on": d.seed.len(),
        "shards": a.shards,
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
