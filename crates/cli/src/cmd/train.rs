//! `tandem train`: trains both towers and publishes them as one new model version.

use std::path::PathBuf;

use anyhow::Result;
use tandem_data::Protocol;
use tandem_model::config::{LogQ, ModelConfig, Pooling, TrainConfig};
use tandem_model::publish::{feature_schema_hash, publish_model};
use tandem_model::train::{train, TrainInput};
use tandem_types::{ModelManifest, ModelVersion};

use crate::args::{print_json, EventArgs, FeatureArgs};

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

    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    pub epochs: usize,
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    pub batch_size: usize,
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    pub lr: f64,
    #[arg(long, default_value_t = TrainConfig::default().weight_decay)]
    pub weight_decay: f64,
    /// Softmax temperature τ (initial value with --learn-temperature).
    #[arg(long, default_value_t = TrainConfig::default().temperature)]
    pub temperature: f64,
    #[arg(long)]
    pub learn_temperature: bool,
    /// Item-frequency estimator for the logQ correction: off, exact, cms or yi.
    #[arg(long, default_value = "exact")]
    pub logq: LogQ,
    /// Uniformly sampled corpus negatives per batch (mixed negatives), 0 = in-batch only.
    #[arg(long, default_value_t = 0)]
    pub uniform_negatives: usize,
    /// Probability of training with the out-of-vocabulary id instead of the real one.
    #[arg(long, default_value_t = TrainConfig::default().id_dropout)]
    pub id_dropout: f64,
    /// Epochs without validation improvement before stopping.
    #[arg(long, default_value_t = TrainConfig::default().patience)]
    pub patience: usize,
    /// Validation users scored per epoch (seeded sample).
    #[arg(long, default_value_t = TrainConfig::default().max_validation_users)]
    pub max_validation_users: usize,
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub seed: u64,

    /// Output embedding dimension.
    #[arg(long, default_value_t = ModelConfig::default().dim)]
    pub dim: usize,
    #[arg(long, default_value_t = ModelConfig::default().id_dim)]
    pub id_dim: usize,
    #[arg(long, default_value_t = ModelConfig::default().feature_dim)]
    pub feature_dim: usize,
    #[arg(long, default_value_t = ModelConfig::default().hidden)]
    pub hidden: usize,
    /// Length L of the recent engagement sequence.
    #[arg(long, default_value_t = ModelConfig::default().history)]
    pub history: usize,
    /// History pooling: mean or attention.
    #[arg(long, default_value = "mean")]
    pub pooling: Pooling,
    /// Leave the user-id embedding out of the user tower.
    #[arg(long)]
    pub no_user_id: bool,

    /// Print a JSON summary instead of text (and no progress bar).
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl Args {
    pub fn configs(&self) -> Result<(ModelConfig, TrainConfig)> {
        if self.batch_size < 2 {
            anyhow::bail!("--batch-size must be at least 2 (in-batch negatives)");
        }
        if !(self.temperature.is_finite()
            && self.temperature > 0.0
            && self.lr.is_finite()
            && self.lr > 0.0)
        {
            anyhow::bail!("--temperature and --lr must be positive");
        }
        if self.dim == 0
            || self.id_dim == 0
            || self.hidden == 0
            || self.history == 0
            || self.feature_dim == 0
        {
            anyhow::bail!("dimensions and --history must be positive");
        }
        let model = ModelConfig {
            dim: self.dim,
            id_dim: self.id_dim,
            feature_dim: self.feature_dim,
            hidden: self.hidden,
            history: self.history,
            pooling: self.pooling,
            use_user_id: !self.no_user_id,
            ..Default::default()
        };
        let train = TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            weight_decay: self.weight_decay,
            temperature: self.temperature,
            learn_temperature: self.learn_temperature,
            logq: self.logq,
            uniform_negatives: self.uniform_negatives,
            id_dropout: self.id_dropout,
            patience: self.patience,
            max_validation_users: self.max_validation_users,
            seed: self.seed,
            ..Default::default()
        };
        Ok((model, train))
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
    let input = TrainInput {
        log: &log,
        user_features: user_features.as_ref(),
        item_features: item_features.as_ref(),
        validation,
    };
    let progress = !a.json && !a.quiet;
    let (model, report) = train(&input, &model_cfg, &train_cfg, progress)?;
    let meta = ModelManifest {
        dim: model_cfg.dim,
        feature_schema_hash: feature_schema_hash(&model),
        data: log.data_range(),
        hyperparameters: serde_json::json!({
            "model": model_cfg,
            "train": train_cfg,
            "validation_protocol": a.protocol,
            "events": a.events.events,
        }),
        validation: report.validation.clone(),
        train_seconds: report.seconds,
    };
    let published = publish_model(&a.out, &a.model_name, a.version, &model, &meta)?;
    let summary = serde_json::json!({
        "model": a.model_name,
        "version": published.version,
        "dir": published.dir,
        "best_epoch": report.best_epoch,
        "validation": report.validation,
        "examples": report.examples,
        "seconds": report.seconds,
        "epochs": report.epochs,
    });
    if a.json {
        print_json(&summary)?;
    } else {
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
            published.version,
            published.dir.display()
        );
    }
    Ok(())
}
