//! `tandem retrain` (one cycle with `--once`, a daemon with `--every`) and `tandem history`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tandem_client::FleetAdmin;

use crate::args::{AdminArgs, ClientTlsArgs};
use tandem_retrain::{CycleOptions, Fault, History, Outcome, RetrainConfig, Retrainer};

use crate::args::{parse_duration, print_json};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("schedule").required(true).args(["once", "every"])))]
pub struct Args {
    /// The events: a segment directory as the user-tower service writes it, an event file, or
    /// `nats://HOST:4222` to read the window from the NATS JetStream engagement stream.
    #[arg(long, env = "TANDEM_EVENT_LOG")]
    pub events: String,
    #[command(flatten)]
    pub nats: crate::args::NatsArgs,
    /// Artifact store root.
    #[arg(long, env = "TANDEM_ARTIFACTS", default_value = "artifacts")]
    pub artifacts: PathBuf,
    #[arg(long, env = "TANDEM_MODEL", default_value = "tandem")]
    pub model: String,
    /// Retraining configuration (TOML with [window], [gate], [canary], [rollout], [model],
    /// [train]); the documented defaults when omitted.
    #[arg(long, env = "TANDEM_RETRAIN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Run one cycle and exit (for cron or a Kubernetes CronJob).
    #[arg(long)]
    pub once: bool,
    /// Run a cycle every DURATION (90s, 30m, 6h, 1d) until SIGINT or SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    pub every: Option<Duration>,
    /// ANN host URLs in rollout order; without them a passing candidate is published only.
    #[arg(long, env = "TANDEM_ANN_HOSTS", value_delimiter = ',')]
    pub hosts: Vec<String>,
    #[arg(long, env = "TANDEM_USER_TOWER")]
    pub user_tower: Option<String>,
    /// Homefeed orchestrator URL for the canary probe (no canary without it).
    #[arg(long, env = "TANDEM_HOMEFEED")]
    pub homefeed: Option<String>,
    #[command(flatten)]
    pub admin: AdminArgs,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    #[arg(long)]
    pub user_features: Option<PathBuf>,
    #[arg(long)]
    pub item_features: Option<PathBuf>,
    /// Inject a fault, for drills: shuffle-train-items or crash-training.
    #[arg(long)]
    pub fault: Option<Fault>,
    /// Where candidate models train: cpu, cuda or cuda:N (CUDA needs a build with `--features
    /// cuda`) [default: cpu].
    #[arg(long, env = "TANDEM_TRAIN_DEVICE")]
    pub device: Option<tandem_model::config::TrainDevice>,
    /// Print each cycle's record as JSON.
    #[arg(long)]
    pub json: bool,
    /// Serve Prometheus metrics (cycle outcomes, serving version) on this address; with
    /// `--every` only (a single `--once` cycle has nothing left to scrape when it ends).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(clap::Args, Debug)]
pub struct HistoryArgs {
    #[arg(long, env = "TANDEM_ARTIFACTS", default_value = "artifacts")]
    pub artifacts: PathBuf,
    #[arg(long, env = "TANDEM_MODEL", default_value = "tandem")]
    pub model: String,
    /// Draw the metrics across cycles to FILE (.svg or .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

fn options(a: &Args) -> Result<CycleOptions> {
    let mut o = CycleOptions::new(a.artifacts.clone(), &a.model, PathBuf::from(&a.events));
    if tandem_stream::is_nats_url(&a.events) {
        o.events_stream = Some(a.nats.options(&a.events, "tandem-retrain"));
    }
    o.user_features = a.user_features.clone();
    o.item_features = a.item_features.clone();
    o.homefeed = a.homefeed.clone();
    o.client = a.tls.options(None)?;
    o.fault = a.fault;
    if !a.hosts.is_empty() {
        let Some(user_tower) = &a.user_tower else {
            bail!("--hosts needs --user-tower (the rollout checks that the user tower has the version)");
        };
        let token = a.admin.required()?;
        o.fleet = Some(FleetAdmin::new(
            &a.hosts,
            user_tower,
            a.artifacts.clone(),
            &a.model,
            &a.tls.options(Some(token))?,
        )?);
    }
    if !a.json {
        o.say = Arc::new(|m| eprintln!("{m}"));
    }
    Ok(o)
}

pub fn run(a: Args) -> Result<()> {
    let mut cfg = match &a.config {
        Some(p) => RetrainConfig::read(p)?,
        None => RetrainConfig::default(),
    };
    if let Some(device) = a.device {
        device
            .open()
            .with_context(|| format!("--device {device}"))?;
        cfg.train.device = device;
    }
    if a.metrics_listen.is_some() && a.every.is_none() {
        bail!(
            "--metrics-listen needs --every: a --once cycle has ended before anything scrapes it"
        );
    }
    if !tandem_stream::is_nats_url(&a.events) && !std::path::Path::new(&a.events).exists() {
        bail!("{}: no such event log", a.events);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Lazy gRPC channels (the fleet's clients) need a runtime to exist when they are made.
    let _in_runtime = rt.enter();
    let retrainer = Retrainer::new(options(&a)?, cfg);
    rt.block_on(async move {
        if let Some(every) = a.every {
            let listener = crate::cmd::serve::bind_metrics(a.metrics_listen).await?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let metrics = listener.map(|l| {
                if let Ok(addr) = l.local_addr() {
                    eprintln!("metrics on http://{addr}/metrics");
                }
                tokio::spawn(tandem_telemetry::serve_metrics(
                    retrainer.metrics().clone(),
                    l,
                    async move {
                        let _ = stopped.await;
                    },
                ))
            });
            retrainer
                .run_every(every, crate::cmd::serve::shutdown_signal())
                .await?;
            let _ = stop.send(());
            if let Some(m) = metrics {
                let _ = m.await;
            }
            return Ok(());
        }
        retrainer.resume().await?;
        let rec = retrainer.run_cycle().await;
        if a.json {
            print_json(&rec)?;
        }
        match rec.outcome {
            Outcome::Failed | Outcome::RolledBack => {
                bail!(
                    "cycle {} {}: {}",
                    rec.cycle,
                    rec.outcome.as_str(),
                    rec.reason
                )
            }
            _ => Ok(()),
        }
    })
}

pub fn history(a: HistoryArgs) -> Result<()> {
    if !a.artifacts.is_dir() {
        bail!("{}: no such artifact store", a.artifacts.display());
    }
    let h = History::for_model(&a.artifacts, &a.model);
    let cycles = h.cycles()?;
    if let Some(path) = &a.plot {
        crate::plot::plot(&cycles, path)?;
        if !a.json {
            eprintln!("wrote {}", path.display());
        }
    }
    if a.json {
        return print_json(&cycles);
    }
    if cycles.is_empty() {
        println!("no retrain cycles recorded in {}", h.path().display());
        return Ok(());
    }
    println!(
        "{:>5}  {:<20} {:<12} {:<9} {:>8} {:>8}  reason",
        "cycle", "started (UTC)", "outcome", "version", "cand", "champ"
    );
    for c in &cycles {
        let started = chrono::DateTime::from_timestamp(c.started_at, 0)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        let metric = |m: &std::collections::BTreeMap<String, f64>| {
            m.get("recall@50")
                .map_or("-".to_string(), |v| format!("{v:.4}"))
        };
        let version = match (&c.champion, &c.version) {
            (_, Some(v)) => v.to_string(),
            (Some(ch), None) => format!("({ch})"),
            _ => "-".into(),
        };
        println!(
            "{:>5}  {:<20} {:<12} {:<9} {:>8} {:>8}  {}",
            c.cycle,
            started,
            c.outcome.as_str(),
            version,
            metric(&c.candidate_metrics),
            metric(&c.champion_metrics),
            c.reason
        );
    }
    Ok(())
}
