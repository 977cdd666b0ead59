//! `tandem tune`: a seeded successive-halving search over the hyper-parameters, scored only on a
//! validation slice carved from `--events`; writes the winner as a TOML that `tandem train
//! --config` and the retrainer's `retrain.toml` read.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tandem_data::Protocol;
use tandem_pipeline::tune::{tune, TuneOptions};

use crate::args::{parse_duration, print_json, EventArgs, FeatureArgs};
use crate::hyper::Hyper;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub events: EventArgs,
    #[command(flatten)]
    pub features: FeatureArgs,
    /// The search's starting point (and trial 0): defaults, --config, then these flags.
    #[command(flatten)]
    pub hyper: Hyper,
    /// Wall-clock budget (90s, 20m, 1h): no new trial starts once it is spent.
    #[arg(long, value_parser = parse_duration, default_value = "20m")]
    pub budget: Duration,
    /// Configurations sampled (the first is the starting point).
    #[arg(long, default_value_t = 9)]
    pub trials: usize,
    /// Protocol carving the validation slice from --events: user or global.
    #[arg(long, default_value = "user")]
    pub protocol: Protocol,
    /// Seed of the search (which configurations are sampled).
    #[arg(long, default_value_t = 7)]
    pub search_seed: u64,
    /// Where to write the winning [model] and [train] (TOML); every trial goes to
    /// <out>.trials.json beside it.
    #[arg(long, default_value = "tuned.toml")]
    pub out: PathBuf,
    /// Print the search record as JSON (and no progress bar).
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    let base = a.hyper.resolve()?;
    let log = a.events.read()?;
    let (user_features, item_features) = a.features.read(&a.events.user_col, &a.events.item_col)?;
    let opts = TuneOptions {
        budget: a.budget,
        trials: a.trials.max(1),
        seed: a.search_seed,
        protocol: a.protocol,
        rungs: vec![3, 9, base.1.epochs.max(9)],
    };
    let bar = if a.json || a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "tune [{bar:30}] {pos}/{len} trainings, {elapsed} of the budget · {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let report = tune(
        &log,
        user_features.as_ref(),
        item_features.as_ref(),
        &base,
        &opts,
        &mut |done, total, msg| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(msg.to_string());
        },
    )?;
    bar.finish_and_clear();
    let best = &report.trials[report.best];
    // Trials ran with a rung's epoch cap and without the refit; the written configuration
    // trains as the starting point does (full early-stopping budget, refit as configured).
    let mut winner = best.train.clone();
    winner.epochs = base.1.epochs;
    winner.refit = base.1.refit;
    let toml = format!(
        "# tandem tune: trial {} of {} (rung {}), {} {:.4} on the validation slice ({:?} protocol) of {}\n# defaults scored {}\n{}",
        best.id,
        a.trials,
        best.rung,
        best.train.early_stopping_metric,
        best.score,
        a.protocol,
        a.events.events.display(),
        report
            .default_score
            .map_or("—".to_string(), |s| format!("{s:.4}")),
        toml::to_string(&serde_json::json!({"model": best.model, "train": winner}))
            .context("encoding the winner as TOML")?
    );
    tandem_artifact::write_atomic(&a.out, toml.as_bytes())?;
    let trials_path = a.out.with_extension("trials.json");
    tandem_artifact::write_atomic(&trials_path, &serde_json::to_vec_pretty(&report)?)?;
    if a.json {
        return print_json(&serde_json::json!({
            "out": a.out,
            "trials_file": trials_path,
            "best": best,
            "default_score": report.default_score,
            "trainings": report.trials.len(),
            "seconds": report.seconds,
            "budget_exhausted": report.budget_exhausted,
        }));
    }
    println!(
        "best: trial {} ({} {:.4} on validation; defaults {}) after {} trainings in {:.0}s{} → {} (all trials: {})",
        best.id,
        best.train.early_stopping_metric,
        best.score,
        report
            .default_score
            .map_or("—".to_string(), |s| format!("{s:.4}")),
        report.trials.len(),
        report.seconds,
        if report.budget_exhausted {
            " (budget spent)"
        } else {
            ""
        },
        a.out.display(),
        trials_path.display()
    );
    Ok(())
}
