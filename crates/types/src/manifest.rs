//! The manifest payload of a model version.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Time range and size of the events a model was trained on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataRange {
    pub events: u64,
    pub users: u64,
    pub items: u64,
    pub min_timestamp: i64,
    pub max_timestamp: i64,
    /// sha256 over the (user, item, timestamp) stream the model saw, so a retrainer can tell
    /// whether two versions were trained on the same data.
    #[serde(default)]
    pub fingerprint: String,
}

/// The manifest payload of a model version (the artifact store adds names, version and
/// checksums around it).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModelManifest {
    pub dim: usize,
    /// Hash of the feature schema (feature names, kinds and vocabulary sizes): two versions with
    /// the same hash accept the same request features.
    pub feature_schema_hash: String,
    pub data: DataRange,
    /// Training hyper-parameters as given (a JSON object, so adding one never breaks old readers).
    pub hyperparameters: serde_json::Value,
    /// Validation metrics of the kept weights (e.g. `recall@50`).
    #[serde(default)]
    pub validation: BTreeMap<String, f64>,
    /// Seconds spent training.
    #[serde(default)]
    pub train_seconds: f64,
}
