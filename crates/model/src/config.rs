//! Model and training configuration. Both are serialised into the model manifest, so every field
//! has a default and old manifests stay readable.

use serde::{Deserialize, Serialize};

/// How the user tower encodes the recent engagement sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UserEncoder {
    /// The mean of the last L items' embeddings, plus the most recent item on its own.
    #[default]
    Mean,
    /// A learned query attends over the sequence (masked softmax).
    Attention,
    /// A causal self-attention encoder over the last L items (relative positions, time gaps
    /// between events), trained on every prefix in one pass: each position predicts what
    /// follows it.
    Transformer,
}

impl std::str::FromStr for UserEncoder {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mean" => Ok(UserEncoder::Mean),
            "attention" => Ok(UserEncoder::Attention),
            "transformer" => Ok(UserEncoder::Transformer),
            other => Err(format!(
                "unknown user encoder {other:?} (expected mean, attention or transformer)"
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
    #[serde(alias = "pooling")]
    pub user_encoder: UserEncoder,
    /// Transformer encoder: self-attention blocks and heads per block.
    pub seq_layers: usize,
    pub seq_heads: usize,
    /// Cap on values kept for a multi-valued feature.
    pub max_multi: usize,
    /// Whether the user-id embedding is used (off by default: for users with few events it
    /// memorises noise; measured in the README).
    pub use_user_id: bool,
    /// A summary of the longer history beside the recent sequence: the mean embedding of up to
    /// `long_history` distinct items engaged with before the recent L (0 = none). The serving
    /// user tower keeps L + `long_history` recent items per user.
    pub long_history: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            dim: 64,
            id_dim: 64,
            feature_dim: 16,
            hidden: 256,
            history: 50,
            user_encoder: UserEncoder::Mean,
            seq_layers: 2,
            seq_heads: 2,
            max_multi: 8,
            use_user_id: false,
            long_history: 0,
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

/// Which candidates each example's softmax runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Negatives {
    /// `full` for catalogues up to [`FULL_SOFTMAX_MAX_ITEMS`], `mixed` above.
    #[default]
    Auto,
    /// The batch's other positives, logQ-corrected.
    InBatch,
    /// In-batch plus `uniform_negatives` uniformly sampled corpus items, each corrected.
    Mixed,
    /// Every catalogue item: the exact softmax, no sampling and no correction.
    Full,
}

/// Above this many items `auto` negatives are `mixed` instead of `full` (see the README for the
/// measured cost of a full-softmax step).
pub const FULL_SOFTMAX_MAX_ITEMS: usize = 10_000;

impl Negatives {
    /// The concrete choice for a catalogue of `items`.
    pub fn resolve(self, items: usize) -> Negatives {
        match self {
            Negatives::Auto if items <= FULL_SOFTMAX_MAX_ITEMS => Negatives::Full,
            Negatives::Auto => Negatives::Mixed,
            n => n,
        }
    }
}

impl std::str::FromStr for Negatives {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Negatives::Auto),
            "in-batch" => Ok(Negatives::InBatch),
            "mixed" => Ok(Negatives::Mixed),
            "full" => Ok(Negatives::Full),
            other => Err(format!(
                "unknown negatives {other:?} (expected auto, in-batch, mixed or full)"
            )),
        }
    }
}

/// Which events are training targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Targets {
    /// Every event.
    All,
    /// Only a user's first engagement with each item (repeats stay in the history): the model
    /// learns what a user will discover next, which is what retrieval with seen items excluded
    /// is judged on.
    #[default]
    New,
}

impl std::str::FromStr for Targets {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Targets::All),
            "new" => Ok(Targets::New),
            other => Err(format!("unknown targets {other:?} (expected all or new)")),
        }
    }
}

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Examples per step; 0 = auto (about 250 steps per epoch, a power of two in 64..=1024).
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Softmax temperature τ (the initial value when learned).
    pub temperature: f64,
    pub learn_temperature: bool,
    pub logq: LogQ,
    /// Which candidates the softmax runs over.
    pub negatives: Negatives,
    /// Uniformly sampled corpus negatives per batch, shared by all rows (`mixed` only).
    pub uniform_negatives: usize,
    /// Leave the items a user engaged with before an example out of that example's negatives.
    pub mask_seen: bool,
    pub targets: Targets,
    /// Each example's target is drawn from the user's next `target_window` events (1: the next
    /// event only; 0 = auto, a fifth of the median user's events in 1..=20), so the user
    /// embedding learns what the user will engage with over a stretch of future, not just next.
    pub target_window: usize,
    /// Dropout on the towers' MLP inputs while training.
    pub dropout: f64,
    /// After early stopping chose the epoch count on the validation slice, train again from
    /// scratch on every event for that many epochs and publish that model.
    pub refit: bool,
    /// Probability of replacing an id by the out-of-vocabulary id during training, so the OOV
    /// embeddings learn a generic cold-start representation.
    pub id_dropout: f64,
    /// Stop after this many epochs without a better validation score.
    pub patience: usize,
    /// The validation metric early stopping maximises: a metric name (`recall@50`) or a sum of
    /// them (`recall@50+ndcg@10`).
    pub early_stopping_metric: String,
    /// Cap on validation users scored per epoch (a seeded sample).
    pub max_validation_users: usize,
    pub seed: u64,
    /// Where the training steps run. Not part of what a model is: never written with it.
    #[serde(skip)]
    pub device: TrainDevice,
}

/// Where training runs (`--device cpu|cuda[:N]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrainDevice {
    #[default]
    Cpu,
    /// The CUDA GPU of this ordinal (needs a build with the `cuda` feature).
    Cuda(usize),
}

impl TrainDevice {
    /// The candle device; a clear error where this build has no CUDA support.
    pub fn open(self) -> candle_core::Result<candle_core::Device> {
        match self {
            TrainDevice::Cpu => Ok(candle_core::Device::Cpu),
            TrainDevice::Cuda(n) if candle_core::utils::cuda_is_available() => {
                candle_core::Device::new_cuda(n)
            }
            TrainDevice::Cuda(_) => Err(candle_core::Error::Msg(
                "this tandem was built without CUDA support: rebuild with `--features cuda`".into(),
            )),
        }
    }
}

impl std::fmt::Display for TrainDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrainDevice::Cpu => f.write_str("cpu"),
            TrainDevice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for TrainDevice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("unknown device {s:?} (expected cpu, cuda or cuda:N)");
        match s {
            "cpu" => Ok(TrainDevice::Cpu),
            "cuda" => Ok(TrainDevice::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                n.parse().map(TrainDevice::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 30,
            batch_size: 0,
            lr: 2e-3,
            weight_decay: 1e-5,
            temperature: 0.05,
            learn_temperature: false,
            logq: LogQ::Exact,
            negatives: Negatives::Auto,
            uniform_negatives: 1024,
            mask_seen: true,
            targets: Targets::New,
            target_window: 0,
            dropout: 0.3,
            refit: true,
            id_dropout: 0.05,
            patience: 3,
            early_stopping_metric: "recall@50+ndcg@10".into(),
            max_validation_users: 3000,
            seed: 1,
            device: TrainDevice::Cpu,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print_back() {
        for (text, device) in [
            ("cpu", TrainDevice::Cpu),
            ("cuda", TrainDevice::Cuda(0)),
            ("cuda:3", TrainDevice::Cuda(3)),
        ] {
            assert_eq!(text.parse::<TrainDevice>().unwrap(), device);
        }
        assert_eq!(TrainDevice::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            assert!(bad
                .parse::<TrainDevice>()
                .unwrap_err()
                .contains("unknown device"));
        }
    }
}
