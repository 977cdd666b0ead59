//! [`ModelVersion`]: the one type a model version has from every gRPC adapter inward.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

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

/// Serde for an optional version that older records wrote as `""` when there was none: reads
/// `null`, `""` or `"vN"`, writes `null` or `"vN"`.
pub mod optional {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ModelVersion>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        match s.as_deref() {
            None | Some("") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(serde::de::Error::custom),
        }
    }

    pub fn serialize<S: serde::Serializer>(
        v: &Option<ModelVersion>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }
}

impl ModelVersion {
    /// Parses a version field of a wire message, where the empty string means "none".
    pub fn parse_optional(s: &str) -> Result<Option<ModelVersion>, ParseVersionError> {
        if s.is_empty() {
            Ok(None)
        } else {
            s.parse().map(Some)
        }
    }
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

    #[test]
    fn optional_versions_read_empty_strings_as_none() {
        #[derive(Deserialize, Serialize)]
        struct R {
            #[serde(with = "optional", default)]
            v: Option<ModelVersion>,
        }
        let r: R = serde_json::from_str(r#"{"v": ""}"#).unwrap();
        assert_eq!(r.v, None);
        let r: R = serde_json::from_str(r#"{"v": "v3"}"#).unwrap();
        assert_eq!(r.v, Some(ModelVersion(3)));
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"v":"v3"}"#);
        assert!(serde_json::from_str::<R>(r#"{"v": "latest"}"#).is_err());
        assert_eq!(ModelVersion::parse_optional("").unwrap(), None);
    }
}
