//! Plain data types shared by every Tandem crate: version newtypes and the serde manifests
//! that describe model and index artifacts. No I/O, no async, no tensors: anything that needs
//! those lives one layer up.
//!
//! - [`ModelVersion`]: an ordered version id (`v1`, `v2`, …).
//! - [`ModelManifest`]: what a trained model version carries beside its weights.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A model version. Versions are totally ordered by their number, so "newest" is well defined
/// across processes that share one artifact directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModelVersion(pub u64);

#[derive(Debug, thiserror::Error)]
#[error("invalid model version {0:?}: expected `v<number>`, e.g. v3")]
pub struct ParseVersionError(pub String);

impl FromStr for ModelVersion {
    type Err = ParseVersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix('v').unwrap_or(s);
        digits
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .map(ModelVersion)
            .ok_or_else(|| ParseVersionError(s.to_string()))
    }
}

impl TryFrom<String> for ModelVersion {
    type Error = ParseVersionError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ModelVersion> for String {
    fn from(v: ModelVersion) -> String {
        v.to_string()
    }
}

impl fmt::Display for ModelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_with_or_without_prefix_and_order_numerically() {
        let v2: ModelVersion = "v2".parse().unwrap();
        let v10: ModelVersion = "10".parse().unwrap();
        assert!(v2 < v10);
        assert_eq!(v10.to_string(), "v10");
        assert!("v0".parse::<ModelVersion>().is_err());
        assert!("latest".parse::<ModelVersion>().is_err());
    }

    #[test]
    fn versions_round_trip_through_json_as_strings() {
        let json = serde_json::to_string(&ModelVersion(7)).unwrap();
        assert_eq!(json, "\"v7\"");
        let back: ModelVersion = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ModelVersion(7));
    }
}
