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
//!
//! Training, index building and publishing go through `tandem-pipeline`; fleet operations
//! through `tandem-client`'s [`FleetAdmin`](tandem_client::FleetAdmin).

pub mod canary;
pub mod config;
pub mod cycle;
pub mod gate;
pub mod history;
mod prepare;

pub use config::RetrainConfig;
pub use cycle::{CycleOptions, Fault, Retrainer};
pub use history::{CycleRecord, History, Outcome};

#[derive(Debug, thiserror::Error)]
pub enum RetrainError {
    #[error(transparent)]
    Data(#[from] tandem_data::DataError),
    #[error(transparent)]
    Model(#[from] tandem_model::ModelError),
    #[error(transparent)]
    Pipeline(#[from] tandem_pipeline::PipelineError),
    #[error(transparent)]
    Artifact(#[from] tandem_artifact::ArtifactError),
    #[error(transparent)]
    Registry(#[from] tandem_registry::RegistryError),
    #[error(transparent)]
    Client(#[from] tandem_client::ClientError),
    #[error(transparent)]
    Fleet(#[from] tandem_client::FleetError),
    #[error("{path}: {message}")]
    Config { path: String, message: String },
    #[error("{path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the history: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("reading the engagement stream: {0}")]
    Stream(String),
    #[error("training crashed: {0}")]
    Crashed(String),
    #[error("{events} events in the window: too few to hold out a slice")]
    TooFewEvents { events: usize },
}

pub type Result<T, E = RetrainError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> RetrainError + '_ {
    move |source| RetrainError::Io {
        path: path.display().to_string(),
        source,
    }
}
