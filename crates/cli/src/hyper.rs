//! The model and training hyper-parameters as flags, shared by `train` and `tune`: every flag is
//! optional and overrides the value from `--config FILE` (a TOML with `[model]` and `[train]`,
//! as `tandem tune` writes and `retrain.toml` holds), which itself overrides the defaults.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tandem_model::config::{
    LogQ, ModelConfig, Negatives, Targets, TrainConfig, TrainDevice, UserEncoder,
};

/// `[model]` and `[train]` of a TOML file; other sections (a retrain.toml's) are ignored.
#[derive(serde::Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    model: ModelConfig,
    #[serde(default)]
    train: TrainConfig,
}

/// Reads `[model]` and `[train]` from `path`.
pub fn read_config(path: &Path) -> Result<(ModelConfig, TrainConfig)> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let c: ConfigFile = toml::from_str(&text).with_context(|| path.display().to_string())?;
    Ok((c.model, c.train))
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct Hyper {
    /// Hyper-parameters from a TOML file ([model], [train]; e.g. from `tandem tune`); the flags
    /// below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Maximum epochs (early stopping usually ends sooner) [default: 30].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Examples per step; 0 = auto (about 250 steps per epoch, 64..=1024) [default: 0].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// [default: 0.002]
    #[arg(long)]
    pub lr: Option<f64>,
    /// AdamW weight decay on dense layers and embedding rows [default: 1e-5].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Softmax temperature τ (initial value with --learn-temperature) [default: 0.05].
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub learn_temperature: bool,
    /// Item-frequency estimator for the logQ correction (sampled negatives): off, exact, cms or
    /// yi [default: exact].
    #[arg(long)]
    pub logq: Option<LogQ>,
    /// Softmax candidates: auto (full up to 10k items, mixed above), in-batch, mixed (in-batch
    /// + uniform corpus samples) or full (the whole catalogue) [default: auto].
    #[arg(long)]
    pub negatives: Option<Negatives>,
    /// Uniformly sampled corpus negatives per batch (mixed negatives) [default: 1024].
    #[arg(long)]
    pub uniform_negatives: Option<usize>,
    /// Keep items the user engaged with before an example among its negatives.
    #[arg(long)]
    pub no_mask_seen: bool,
    /// Training targets: new (a user's first engagement with each item) or all [default: new].
    #[arg(long)]
    pub targets: Option<Targets>,
    /// Draw each example's target from the user's next N events; 0 = auto (a fifth of the
    /// median user's events, 1..=20) [default: 0].
    #[arg(long)]
    pub target_window: Option<usize>,
    /// Dropout on the towers' MLP inputs (and inside the transformer) [default: 0.3].
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Publish the model early stopping kept instead of refitting on every event for that many
    /// epochs.
    #[arg(long)]
    pub no_refit: bool,
    /// Probability of training with the out-of-vocabulary id instead of the real one
    /// [default: 0.05].
    #[arg(long)]
    pub id_dropout: Option<f64>,
    /// Epochs without validation improvement before stopping [default: 3].
    #[arg(long)]
    pub patience: Option<usize>,
    /// Validation users scored per epoch (seeded sample) [default: 3000].
    #[arg(long)]
    pub max_validation_users: Option<usize>,
    /// [default: 1]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where training steps run: cpu, cuda or cuda:N (CUDA needs a build with `--features
    /// cuda`) [default: cpu].
    #[arg(long)]
    pub device: Option<TrainDevice>,

    /// Output embedding dimension [default: 64].
    #[arg(long)]
    pub dim: Option<usize>,
    /// Id embedding width [default: 64].
    #[arg(long)]
    pub id_dim: Option<usize>,
    /// Categorical feature embedding width [default: 16].
    #[arg(long)]
    pub feature_dim: Option<usize>,
    /// Hidden width of each tower's MLP [default: 256].
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Length L of the recent engagement sequence [default: 50].
    #[arg(long)]
    pub history: Option<usize>,
    /// User encoder over the recent sequence: mean, attention or transformer [default: mean].
    #[arg(long, alias = "pooling")]
    pub user_encoder: Option<UserEncoder>,
    /// Use a per-user id embedding (off by default: for users with few events it memorises
    /// noise).
    #[arg(long, conflicts_with = "no_user_id")]
    pub user_id: bool,
    /// Leave the user-id embedding out of the user tower (the default).
    #[arg(long)]
    pub no_user_id: bool,
    /// Summarise up to N distinct items older than the recent sequence (0 = off) [default: 0].
    #[arg(long)]
    pub long_history: Option<usize>,
}

impl Hyper {
    /// Defaults, then `--config`, then the flags given; checked.
    pub fn resolve(&self) -> Result<(ModelConfig, TrainConfig)> {
        let (mut m, mut t) = match &self.config {
            Some(p) => read_config(p)?,
            None => (ModelConfig::default(), TrainConfig::default()),
        };
        macro_rules! set {
            ($dst:expr, $src:expr) => {
                if let Some(v) = $src {
                    $dst = v;
                }
            };
        }
        set!(t.epochs, self.epochs);
        set!(t.batch_size, self.batch_size);
        set!(t.lr, self.lr);
        set!(t.weight_decay, self.weight_decay);
        set!(t.temperature, self.temperature);
        set!(t.logq, self.logq);
        set!(t.negatives, self.negatives);
        set!(t.uniform_negatives, self.uniform_negatives);
        set!(t.targets, self.targets);
        set!(t.target_window, self.target_window);
        set!(t.dropout, self.dropout);
        set!(t.id_dropout, self.id_dropout);
        set!(t.patience, self.patience);
        set!(t.max_validation_users, self.max_validation_users);
        set!(t.seed, self.seed);
        set!(t.device, self.device);
        t.learn_temperature |= self.learn_temperature;
        t.mask_seen &= !self.no_mask_seen;
        t.refit &= !self.no_refit;
        set!(m.dim, self.dim);
        set!(m.id_dim, self.id_dim);
        set!(m.feature_dim, self.feature_dim);
        set!(m.hidden, self.hidden);
        set!(m.history, self.history);
        set!(m.user_encoder, self.user_encoder);
        set!(m.long_history, self.long_history);
        if self.user_id {
            m.use_user_id = true;
        }
        if self.no_user_id {
            m.use_user_id = false;
        }
        check(&m, &t)?;
        // Refuse an unusable device before reading any data.
        t.device
            .open()
            .with_context(|| format!("--device {}", t.device))?;
        Ok((m, t))
    }
}

/// Refuses settings training cannot run with, naming the flag.
pub fn check(m: &ModelConfig, t: &TrainConfig) -> Result<()> {
    if t.batch_size == 1 {
        bail!("--batch-size must be 0 (auto) or at least 2");
    }
    if !(0.0..1.0).contains(&t.dropout) {
        bail!("--dropout must be in [0, 1)");
    }
    if !(t.temperature.is_finite() && t.temperature > 0.0 && t.lr.is_finite() && t.lr > 0.0) {
        bail!("--temperature and --lr must be positive");
    }
    if m.dim == 0 || m.id_dim == 0 || m.hidden == 0 || m.history == 0 || m.feature_dim == 0 {
        bail!("dimensions and --history must be positive");
    }
    if m.user_encoder == UserEncoder::Transformer && !m.id_dim.is_multiple_of(m.seq_heads.max(1)) {
        bail!(
            "--id-dim {} must be a multiple of the transformer's {} heads",
            m.id_dim,
            m.seq_heads
        );
    }
    Ok(())
}
