//! The retrainer's TOML configuration. Every table and field is optional; unknown fields are an
//! error (a misspelt gate threshold must not silently fall back to its default).
//!
//! ```toml
//! [window]
//! days = 30.0              # sliding window of the event log
//! holdout_fraction = 0.1   # most recent share of the window: the gate's held-out slice
//! min_new_events = 100     # skip the cycle unless this many events are newer than the champion's data
//!
//! [gate]
//! metric = "recall@50"
//! min_delta = -0.005       # candidate ≥ champion + min_delta
//! min_coverage_ratio = 0.8 # coverage@10 ≥ ratio × champion's
//! min_ann_recall = 0.95    # the candidate index's recall@10 against exact search
//! max_norm_error = 0.01    # |‖e‖ − 1| of sampled embeddings
//!
//! [canary]
//! hosts = 1                # hosts moved before the first watch
//! watch_seconds = 30
//! probe_users = 200
//! k = 50
//! max_error_rate = 0.01
//! min_hit_ratio = 0.8      # live hit rate ≥ ratio × the champion's, measured just before
//!
//! [index]
//! shards = 2               # split the candidate's index; default: the champion's layout
//!
//! [rollout]
//! pause_ms = 0
//! host_timeout_s = 120
//! user_tower_timeout_s = 120
//! keep_versions = 5        # retention after a deploy (pinned versions are never deleted)
//!
//! [model]   # tandem_model::ModelConfig fields
//! [train]   # tandem_model::TrainConfig fields
//! ```
//!
//! A top-level `tuned = "tuned.toml"` (relative to this file) takes `[model]` and `[train]` from
//! a `tandem tune` result instead.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tandem_model::{ModelConfig, TrainConfig};

use crate::{Result, RetrainError};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrainConfig {
    /// A `tandem tune` output whose `[model]` and `[train]` replace this file's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tuned: Option<std::path::PathBuf>,
    pub window: WindowConfig,
    pub gate: GateConfig,
    pub canary: CanaryConfig,
    pub rollout: RolloutConfig,
    pub index: IndexConfig,
    pub model: ModelConfig,
    pub train: TrainConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WindowConfig {
    pub days: f64,
    pub holdout_fraction: f64,
    pub min_new_events: usize,
    /// Cap on held-out users the gate scores (a seeded sample).
    pub eval_users: usize,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            days: 30.0,
            holdout_fraction: 0.1,
            min_new_events: 100,
            eval_users: 3000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateConfig {
    pub metric: String,
    pub min_delta: f64,
    pub min_coverage_ratio: f64,
    pub min_ann_recall: f64,
    pub max_norm_error: f64,
    /// An absolute floor on the metric (also applied when there is no champion).
    pub min_metric: f64,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            metric: "recall@50".into(),
            min_delta: -0.005,
            min_coverage_ratio: 0.8,
            min_ann_recall: 0.95,
            max_norm_error: 0.01,
            min_metric: 0.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CanaryConfig {
    /// Hosts moved (and watched) before the rest of the fleet; 0 moves all, then watches.
    pub hosts: usize,
    pub watch_seconds: f64,
    pub probe_users: usize,
    pub k: i32,
    pub max_error_rate: f64,
    pub min_hit_ratio: f64,
    /// Pause between probe rounds.
    pub interval_ms: u64,
}

impl Default for CanaryConfig {
    fn default() -> Self {
        CanaryConfig {
            hosts: 1,
            watch_seconds: 30.0,
            probe_users: 200,
            k: 50,
            max_error_rate: 0.01,
            min_hit_ratio: 0.8,
            interval_ms: 250,
        }
    }
}

/// How the candidate's index is laid out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexConfig {
    /// Shards to split the index into (1: whole). Unset: the champion's layout, so a sharded
    /// fleet gets a sharded candidate (a whole index without a champion).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    pub pause_ms: u64,
    pub host_timeout_s: u64,
    pub user_tower_timeout_s: u64,
    pub keep_versions: usize,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            pause_ms: 0,
            host_timeout_s: 120,
            user_tower_timeout_s: 120,
            keep_versions: 5,
        }
    }
}

impl RetrainConfig {
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let cfg: RetrainConfig = toml::from_str(text).map_err(|e| RetrainError::Config {
            path: origin.into(),
            message: e.message().to_string(),
        })?;
        cfg.validate().map_err(|message| RetrainError::Config {
            path: origin.into(),
            message,
        })?;
        Ok(cfg)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(crate::io_err(path))?;
        let mut cfg = Self::from_toml(&text, &path.display().to_string())?;
        if let Some(tuned) = &cfg.tuned {
            let tuned = path.parent().unwrap_or(Path::new(".")).join(tuned);
            let text = std::fs::read_to_string(&tuned).map_err(crate::io_err(&tuned))?;
            #[derive(Deserialize)]
            struct Tuned {
                #[serde(default)]
                model: ModelConfig,
                #[serde(default)]
                train: TrainConfig,
            }
            let t: Tuned = toml::from_str(&text).map_err(|e| RetrainError::Config {
                path: tuned.display().to_string(),
                message: e.message().to_string(),
            })?;
            cfg.model = t.model;
            cfg.train = t.train;
        }
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        let w = &self.window;
        if w.days.is_nan() || w.days <= 0.0 {
            return Err(format!("window.days must be positive, got {}", w.days));
        }
        if !(w.holdout_fraction > 0.0 && w.holdout_fraction < 0.5) {
            return Err(format!(
                "window.holdout_fraction must be in (0, 0.5), got {}",
                w.holdout_fraction
            ));
        }
        if !self.gate.metric.contains('@') {
            return Err(format!(
                "gate.metric {:?} is not a metric name like recall@50",
                self.gate.metric
            ));
        }
        let c = &self.canary;
        if c.k <= 0 || c.probe_users == 0 || c.watch_seconds < 0.0 {
            return Err(
                "canary.k and canary.probe_users must be positive and canary.watch_seconds ≥ 0"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let c = RetrainConfig::from_toml("", "x").unwrap();
        assert_eq!(c.gate.metric, "recall@50");
        assert_eq!(c.gate.min_delta, -0.005);
        assert_eq!(c.window.holdout_fraction, 0.1);
    }

    #[test]
    fn a_misspelt_field_is_refused_with_its_name() {
        let e = RetrainConfig::from_toml("[gate]\nmin_detla = 0.1\n", "gate.toml").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("gate.toml") && msg.contains("min_detla"),
            "{msg}"
        );
    }

    #[test]
    fn nested_model_and_training_settings_are_read() {
        let c = RetrainConfig::from_toml("[model]\ndim = 16\n[train]\nepochs = 2\n", "x").unwrap();
        assert_eq!(c.model.dim, 16);
        assert_eq!(c.train.epochs, 2);
        assert!(RetrainConfig::from_toml("[window]\nholdout_fraction = 0.9\n", "x").is_err());
    }
}
