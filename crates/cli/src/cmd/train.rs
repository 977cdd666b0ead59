//! `tandem train`: trains both towers and publishes them as one new model version.

use std::path::PathBuf;

use anyhow::Result;
use tandem_data::Protocol;
use tandem_model::config::{ModelConfig, TrainConfig};
use tandem_model::train::TrainInput;
use tandem_pipeline::{train_and_publish, TrainJob};
use tandem_types::ModelVersion;

use crate::args::{print_json, EventArgs, FeatureArgs};
use crate::hyper::Hyper;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub events: EventArgs,
    #[command(flatten)]
    pub features: FeatureArgs,
    /// Artifact store root; the version is written to <out>/models/<model-name>/<version>.
    #[arg(long, env = "TANDEM_ARTIFACTS", default_value = "artifacts")]
    pub out: PathBuf,
    #[arg(long, env = "TANDEM_MODEL", default_value = "tandem")]
    pub model_name: String,
    /// Version to publish (default: the next free one).
    #[arg(long)]
    pub version: Option<ModelVersion>,
    /// Protocol that carves the validation slice: user, global, or none (train on everything for
    /// exactly --epochs).
    #[arg(long, default_value = "user")]
    pub protocol: String,

    #[command(flatten)]
    pub hyper: Hyper,

    /// Print a JSON summary instead of text (and no progress bar).
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl Args {
    pub fn configs(&self) -> Result<(ModelConfig, TrainConfig)> {
        self.hyper.resolve()
    }

    pub fn validation(&self) -> Result<Option<Protocol>> {
        match self.protocol.as_str() {
            "none" => Ok(None),
            p => Ok(Some(p.parse().map_err(anyhow::Error::msg)?)),
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    let (model_cfg, train_cfg) = a.configs()?;
    let validation = a.validation()?;
    let log = a.events.read()?;
    let (user_features, item_features) = a.features.read(&a.events.user_col, &a.events.item_col)?;
    let trained = train_and_publish(TrainJob {
        root: &a.out,
        name: &a.model_name,
        version: a.version,
        input: TrainInput {
            log: &log,
            user_features: user_features.as_ref(),
            item_features: item_features.as_ref(),
            validation,
        },
        model: &model_cfg,
        train: &train_cfg,
        extra: serde_json::json!({
            "validation_protocol": a.protocol,
            "events": a.events.events,
        }),
        index: None,
        progress: !a.json && !a.quiet,
    })?;
    let report = &trained.report;
    if a.json {
        return print_json(&serde_json::json!({
            "model": a.model_name,
            "version": trained.version,
            "dir": trained.dir,
            "best_epoch": report.best_epoch,
            "negatives": report.negatives,
            "batch_size": report.batch_size,
            "target_window": report.target_window,
            "refit": report.refit_epochs.is_some(),
            "validation": report.validation,
            "examples": report.examples,
            "seconds": report.seconds,
            "epochs": report.epochs,
        }));
    }
    let val = report
        .validation
        .get("recall@50")
        .map(|r| {
            format!(
                ", validation recall@50 {r:.4} (epoch {})",
                report.best_epoch
            )
        })
        .unwrap_or_default();
    println!(
        "published {} {} → {}{val}",
        a.model_name,
        trained.version,
        trained.dir.display()
    );
    Ok(())
}
