//! Train → manifest → publish, written once. Every producer of versions goes through here: `tandem
//! train`, `tandem index`, `tandem bootstrap`, the retrain cycle, the demo and the test harness.
//!
//! - [`index`]: catalogue embeddings, recall queries, the HNSW build with its measured recall,
//!   and publishing it as an index version with its version metadata.
//! - [`train_and_publish`]: train a model and publish it — alone, or with its index under the
//!   same version ([`publish_together`]: index first, model last, because the model is the
//!   commit point: the user tower loads models, a rollout needs the user tower to serve the
//!   version first, so an index left alone by a crash is never served).
//! - [`tune`]: the hyper-parameter search of `tandem tune`, on a validation slice only.

pub mod index;
pub mod tune;

pub use index::{
    build_index, build_sharded_index, history_queries, item_vectors, max_norm_error,
    profile_queries, Built, BuiltIndex, BuiltShards,
};

use std::path::{Path, PathBuf};

use tandem_data::EventLog;
use tandem_index::HnswParams;
use tandem_model::config::{ModelConfig, TrainConfig};
use tandem_model::publish::{feature_schema_hash, publish_model};
use tandem_model::train::{train, TrainInput, TrainReport};
use tandem_model::TwoTower;
use tandem_registry::Registry;
use tandem_types::{DataRange, ModelManifest, ModelVersion, INDEXES, MODELS};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
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
    #[error(transparent)]
    Data(#[from] tandem_data::DataError),
    #[error("the model has no items to index")]
    NoItems,
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// The manifest of a trained model: its data, the hyper-parameters as given (`extra` adds keys
/// beside `model` and `train`) and the validation metrics of the kept weights.
pub fn model_manifest(
    model: &TwoTower,
    data: DataRange,
    mcfg: &ModelConfig,
    tcfg: &TrainConfig,
    extra: serde_json::Value,
    report: &TrainReport,
) -> ModelManifest {
    let mut hyper = serde_json::json!({ "model": mcfg, "train": tcfg });
    if let serde_json::Value::Object(extra) = extra {
        hyper
            .as_object_mut()
            .expect("an object literal")
            .extend(extra);
    }
    ModelManifest {
        dim: mcfg.dim,
        feature_schema_hash: feature_schema_hash(model),
        data,
        hyperparameters: hyper,
        validation: report.validation.clone(),
        train_seconds: report.seconds,
    }
}

/// The next version free in both series of `name` (models and indexes), so a version published
/// together never collides with an index left behind by a crash.
pub fn next_version(root: &Path, name: &str) -> Result<ModelVersion> {
    let reg = Registry::open(root);
    let newest = reg
        .list(MODELS, name)?
        .into_iter()
        .chain(reg.list(INDEXES, name)?)
        .max()
        .map_or(0, |v| v.0);
    Ok(ModelVersion(newest + 1))
}

/// Publishes `built` (the index of `model`, whole or sharded) and then `model` as one version
/// (the next free one when `version` is `None`).
pub fn publish_together(
    root: &Path,
    name: &str,
    version: Option<ModelVersion>,
    model: &TwoTower,
    manifest: &ModelManifest,
    built: &Built,
) -> Result<ModelVersion> {
    let version = match version {
        Some(v) => v,
        None => next_version(root, name)?,
    };
    built.publish(root, name, version, &manifest.feature_schema_hash)?;
    publish_model(root, name, Some(version), model, manifest)?;
    Ok(version)
}

/// What to index beside the model (nothing: the model alone is published).
pub struct IndexSpec<'a> {
    pub params: HnswParams,
    /// Recall queries: the histories of up to this many users in `query_log`.
    pub recall_queries: usize,
    pub query_log: &'a EventLog,
    /// Split the index into this many shards (1: whole).
    pub shards: u32,
}

/// A trained, published version.
pub struct Trained {
    pub model: TwoTower,
    pub report: TrainReport,
    pub version: ModelVersion,
    /// The model version directory.
    pub dir: PathBuf,
    pub manifest: ModelManifest,
    pub index: Option<Built>,
}

/// One training run to publish.
pub struct TrainJob<'a> {
    /// Artifact store root.
    pub root: &'a Path,
    pub name: &'a str,
    /// The version to publish as (the next free one when `None`).
    pub version: Option<ModelVersion>,
    pub input: TrainInput<'a>,
    pub model: &'a ModelConfig,
    pub train: &'a TrainConfig,
    /// Recorded in the manifest's hyper-parameters beside `model` and `train`.
    pub extra: serde_json::Value,
    /// Index the model too, under the same version.
    pub index: Option<IndexSpec<'a>>,
    /// A progress bar on stderr.
    pub progress: bool,
}

/// Trains and publishes the model — with its index under the same version when the job asks.
pub fn train_and_publish(job: TrainJob) -> Result<Trained> {
    let (model, report) = train(&job.input, job.model, job.train, job.progress)?;
    let manifest = model_manifest(
        &model,
        job.input.log.data_range(),
        job.model,
        job.train,
        job.extra,
        &report,
    );
    let (version, built) = match job.index {
        Some(spec) => {
            let queries = history_queries(&model, spec.query_log, spec.recall_queries)?;
            let built = Built::build(&model, &spec.params, queries, spec.shards)?;
            let v = publish_together(job.root, job.name, job.version, &model, &manifest, &built)?;
            (v, Some(built))
        }
        None => (
            publish_model(job.root, job.name, job.version, &model, &manifest)?.version,
            None,
        ),
    };
    Ok(Trained {
        dir: tandem_artifact::version_dir(job.root, MODELS, job.name, version),
        model,
        report,
        version,
        manifest,
        index: built,
    })
}

/// Embeds the catalogue of the published model in `model_dir`, builds its index (split into
/// `shards` when more than 1, published together), measures its recall on `queries` and
/// publishes it as the model's version.
pub fn build_and_publish_index(
    root: &Path,
    model_dir: &Path,
    params: &HnswParams,
    queries: impl FnOnce(&TwoTower) -> Result<(Vec<f32>, String)>,
    shards: u32,
) -> Result<(Built, tandem_index::artifact::IndexManifest, PathBuf)> {
    let manifest = tandem_model::model::open(model_dir)?;
    let model = TwoTower::load(model_dir)?;
    let built = Built::build(&model, params, queries(&model)?, shards)?;
    let (published, meta) = built.publish(
        root,
        &manifest.name,
        manifest.version,
        &manifest.meta.feature_schema_hash,
    )?;
    Ok((built, meta, published.dir))
}

/// Trains a small model (16-d, 3 epochs) on a fixed synthetic log of 200 users × 300 items and
/// publishes it with its index as the next free version — the cluster the homefeed benchmark
/// and the test harness start from. `seed` seeds training only, so two seeds give two distinct
/// versions over the same catalogue.
pub fn publish_small_synthetic(root: &Path, name: &str, seed: u64) -> Result<ModelVersion> {
    publish_small_synthetic_sharded(root, name, seed, 1)
}

/// [`publish_small_synthetic`] with the catalogue split into `shards` index shards (one
/// unsharded index when `shards` is 1).
pub fn publish_small_synthetic_sharded(
    root: &Path,
    name: &str,
    seed: u64,
    shards: u32,
) -> Result<ModelVersion> {
    let data = tandem_data::synth::generate(&tandem_data::synth::SynthConfig {
        users: 200,
        items: 300,
        events: 8_000,
        topics: 6,
        seed: 11,
        ..Default::default()
    });
    let mcfg = ModelConfig {
        dim: 16,
        id_dim: 16,
        feature_dim: 4,
        hidden: 32,
        history: 10,
        ..Default::default()
    };
    let tcfg = TrainConfig {
        epochs: 3,
        batch_size: 256,
        lr: 5e-3,
        seed,
        ..Default::default()
    };
    let t = train_and_publish(TrainJob {
        root,
        name,
        version: None,
        input: TrainInput {
            log: &data.events,
            user_features: None,
            item_features: None,
            validation: None,
        },
        model: &mcfg,
        train: &tcfg,
        extra: serde_json::json!({}),
        index: Some(IndexSpec {
            params: HnswParams::default(),
            recall_queries: 200,
            query_log: &data.events,
            shards,
        }),
        progress: false,
    })?;
    Ok(t.version)
}
