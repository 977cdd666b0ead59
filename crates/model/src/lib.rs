//! Tandem's retrieval model: two candle towers trained on logged engagement as extreme
//! multi-class classification (in-batch sampled softmax with logQ correction), their offline
//! evaluation against honest baselines, and their versioned on-disk form.
//!
//! - [`config`]: architecture and training hyper-parameters.
//! - [`bench`]: the training-speed benchmark.
//! - [`ease`]: the EASE baseline (closed form, λ chosen on a validation slice).
//! - [`encode`]: vocabularies and feature encoding.
//! - [`params`]: seeded initialisation and sparse embedding tables (lazy AdamW).
//! - [`towers`]: the user and item towers.
//! - [`sequence`]: the transformer user encoder (causal self-attention, relative positions).
//! - [`loss`]: the corrected sampled-softmax loss.
//! - [`logq`]: item-frequency estimators (exact, count-min, step-gap).
//! - [`train`]: the training loop with early stopping.
//! - [`eval`]: metrics, baselines and the model as a ranker.
//! - [`model`]: inference models, save and load.
//! - [`fused`]: the user tower's candle-free serving forward (mean encoder).
//! - [`publish`]: writing a trained model as an artifact version.

pub mod bench;
pub mod config;
#[cfg(feature = "cuda")]
mod cuda;
pub mod ease;
pub mod encode;
pub mod eval;
pub mod fused;
pub mod logq;
pub mod loss;
pub mod model;
pub mod params;
pub mod publish;
pub mod rowmix;
pub mod sequence;
pub mod towers;
pub mod train;

pub use config::{LogQ, ModelConfig, TrainConfig, UserEncoder};
pub use model::{ItemModel, TwoTower, UserModel, UserRequest};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Artifact(#[from] tandem_artifact::ArtifactError),
    #[error(transparent)]
    Data(#[from] tandem_data::DataError),
    #[error("{file}: missing tensor {name:?}")]
    MissingTensor { file: String, name: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
