//! The drifting-engagement scenario for retraining tests, as one-line steps that panic on
//! failure (the production versions live in `tandem-data`, `tandem-pipeline` and
//! `tandem-cluster`).

use std::path::Path;

pub use tandem_data::drift::{drift, drift_ending, Drift, Fresh};
use tandem_data::{EventLog, Protocol};
use tandem_index::HnswParams;
use tandem_model::config::{ModelConfig, TrainConfig};
use tandem_model::train::{TrainInput, TrainReport};
use tandem_model::TwoTower;
use tandem_pipeline::{train_and_publish, IndexSpec, TrainJob};
use tandem_types::ModelVersion;

/// Writes `log` as the first segment of the user tower's event log in `<root>/events`.
pub fn seed_event_log(root: &Path, log: &EventLog) {
    tandem_data::drift::seed_event_log(&root.join("events"), log).expect("seed the event log");
}

/// Trains a model on `log` and publishes its index (in `shards` shards; 1: whole) and model as
/// version `version` of `name`.
pub fn publish_trained(
    root: &Path,
    name: &str,
    version: ModelVersion,
    log: &EventLog,
    (mcfg, tcfg): (&ModelConfig, &TrainConfig),
    shards: u32,
) -> (TwoTower, TrainReport) {
    let t = train_and_publish(TrainJob {
        root,
        name,
        version: Some(version),
        input: TrainInput {
            log,
            user_features: None,
            item_features: None,
            validation: Some(Protocol::Global),
        },
        model: mcfg,
        train: tcfg,
        extra: serde_json::json!({}),
        index: Some(IndexSpec {
            params: HnswParams::default(),
            recall_queries: 500,
            query_log: log,
            shards,
        }),
        progress: false,
    })
    .expect("train and publish");
    (t.model, t.report)
}

/// Records `events` through the user tower's batch RPC; returns (accepted, rejected).
pub async fn record(url: &str, events: &[Fresh], batch: usize) -> (u64, u64) {
    tandem_cluster::record(url, events, batch)
        .await
        .expect("record events")
}
