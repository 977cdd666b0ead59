//! Auto-retraining and fleet operations.
//!
//! One retraining *cycle* ([`cycle::Retrainer::run_cycle`]):
//!
//! 1. reads a sliding window of the event log the user-tower service writes and holds out its
//!    most recent slice;
//! 2. trains a candidate on the rest and builds its HNSW index;
//! 3. evaluates the candidate **and the serving version (the champion)** on the same held-out
//!    slice, and applies the declarative [`gate`];
//! 4. if the gate passes: publishes index then model under one new version (the model is the
//!    commit point: nothing serves a version before its model exists), waits until the user
//!    tower serves it, rolls the ANN hosts one at a time ([`fleet`]), and watches a [`canary`]
//!    probe; if the canary degrades, every moved host is rolled back.
//!
//! Every cycle is appended to a [`history`] file (fsynced JSON lines), which is also how a
//! restarted daemon resumes: its schedule continues from the last cycle, and a cycle that was
//! interrupted is recorded as failed and any host it had moved is rolled back.
//!
//! - [`config`]: the TOML configuration (window, model, training, gate, canary, rollout).
//! - [`candidate`]: index building and embedding sanity shared with `tandem index`.
//! - [`plot`]: the metrics-across-versions chart of `tandem history --plot` (SVG or PNG).

pub mod canary;
pub mod candidate;
pub mod config;
pub mod cycle;
pub mod fleet;
pub mod gate;
pub mod history;
pub mod plot;

pub use config::RetrainConfig;
pub use cycle::{CycleOptions, Fault, Retrainer};
pub use fleet::Fleet;
pub use history::{CycleRecord, History, Outcome};

#[derive(Debug, thiserror::Error)]
pub enum RetrainError {
    #[error(transparent)]
    Data(#[from] tandem_data::DataError),
    #[error(transparent)]
    Model(#[from] tandem_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Index(#[from] tandem_index::IndexError),
    #[error(transparent)]
    Artifact(#[from] tandem_artifact::ArtifactError),
    #[error(transparent)]
    Registry(#[from] tandem_registry::RegistryError),
    #[error("{url}: {code:?}: {message}")]
    Rpc {
        url: String,
        code: tonic::Code,
        message: String,
    },
    #[error("{url}: cannot connect: {message}")]
    Connect { url: String, message: String },
    #[error("{path}: {message}")]
    Config { path: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Fleet(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = RetrainError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> RetrainError + '_ {
    move |source| RetrainError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
