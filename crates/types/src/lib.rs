//! Plain data types and helpers shared by every Tandem crate: version newtypes, the serde
//! manifests that describe model and index artifacts, the wall clock and latency percentiles.
//! No I/O, no async, no tensors: anything that needs those lives one layer up.
//!
//! - [`ModelVersion`]: an ordered version id (`v1`, `v2`, …), parsed once at every gRPC adapter.
//! - [`ModelManifest`]: what a trained model version carries beside its weights.
//! - [`clock`]: seconds and milliseconds since the Unix epoch.
//! - [`stats`]: the one latency-percentile formula every report uses.
//! - [`MODELS`] and [`INDEXES`]: the artifact kinds (directory names under the store root).

pub mod clock;
pub mod manifest;
pub mod stats;
pub mod vector;
pub mod version;

pub use manifest::{DataRange, ModelManifest};
pub use version::{ModelVersion, ParseVersionError};

/// The artifact kind holding model versions: `ARTIFACTS/models/<name>/vN`.
pub const MODELS: &str = "models";
/// The artifact kind holding index versions: `ARTIFACTS/indexes/<name>/vN`.
pub const INDEXES: &str = "indexes";

/// `e` and its chain of causes as one line, `a: b: c`, leaving out a cause whose text the line
/// already holds (many errors repeat their source's message in their own).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        next = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("reading the log")]
    struct Wraps(#[source] std::io::Error);

    #[test]
    fn error_chains_name_each_cause_once() {
        let io = || std::io::Error::other("disk full");
        assert_eq!(super::error_chain(&Repeats(io())), "outer: disk full");
        assert_eq!(
            super::error_chain(&Wraps(io())),
            "reading the log: disk full"
        );
    }
}
