//! Model and training configuration. Both are serialised into the model manifest, so every field
//! has a default and old manifests stay readable.

use serde::{Deserialize, Serialize};

/// How the user tower pools the recent engagement sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    #[default]
    Mean,
    /// A learned query attends over the sequence (masked softmax).
    Attention,
}

impl std::str::FromStr for Pooling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "attention" => Ok(Pooling::Attention),
            other => Err(format!(
                "unknown pooling {other:?} (expected mean or attention)"
            )),
        }
    }
}

/// Architecture of the two towers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// Output embedding dimension (both towers, L2-normalised).
    pub dim: usize,
    /// Width of user/item id embeddings (also the history item embeddings).
    pub id_dim: usize,
    /// Width of each categorical feature embedding.
    pub feature_dim: usize,
    /// Hidden width of each tower's MLP.
    pub hidden: usize,
    /// Length L of the recent engagement sequence.
    pub history: usize,
    pub pooling: Pooling,
    /// Cap on values kept for a multi-valued feature.
    pub max_multi: usize,
    /// Whether the user-id embedding is used (for sparse users it mostly memorises noise).
    pub use_user_id: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            dim: 64,
            id_dim: 64,
            feature_dim: 16,
            hidden: 256,
            history: 50,
            pooling: Pooling::Mean,
            max_multi: 8,
            use_user_id: true,
        }
    }
}

/// The `--logq` estimator of item sampling probability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogQ {
    Off,
    /// Exact counts over the training stream.
    #[default]
    Exact,
    /// Streaming count-min sketch.
    Cms,
    /// Streaming step-gap estimator (Yi et al., RecSys 2019).
    Yi,
}

impl std::str::FromStr for LogQ {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(LogQ::Off),
            "exact" => Ok(LogQ::Exact),
            "cms" => Ok(LogQ::Cms),
            "yi" => Ok(LogQ::Yi),
            other => Err(format!(
                "unknown logq estimator {other:?} (expected off, exact, cms or yi)"
            )),
        }
    }
}

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Softmax temperature τ (the initial value when learned).
    pub temperature: f64,
    pub learn_temperature: bool,
    pub logq: LogQ,
    /// Uniformly sampled corpus negatives per batch, shared by all rows (0 = in-batch only).
    pub uniform_negatives: usize,
    /// Probability of replacing an id by the out-of-vocabulary id during training, so the OOV
    /// embeddings learn a generic cold-start representation.
    pub id_dropout: f64,
    /// Stop after this many epochs without a better validation score.
    pub patience: usize,
    /// The validation metric early stopping maximises (e.g. `recall@50`).
    pub early_stopping_metric: String,
    /// Cap on validation users scored per epoch (a seeded sample).
    pub max_validation_users: usize,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 30,
            batch_size: 1024,
            lr: 2e-3,
            weight_decay: 1e-5,
            temperature: 0.05,
            learn_temperature: false,
            logq: LogQ::Exact,
            uniform_negatives: 0,
            id_dropout: 0.05,
            patience: 3,
            early_stopping_metric: "recall@50".into(),
            max_validation_users: 3000,
            seed: 1,
        }
    }
}
