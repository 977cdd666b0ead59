//! A drifting-engagement scenario anchored at the present, for retraining tests and `tandem demo`:
//! a synthetic log whose older part seeds the user tower's event log (and trains v1) and whose
//! newer part — where user interests have drifted — arrives live through `RecordEngagement`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tandem_data::synth::{generate, SynthConfig};
use tandem_data::{EventLog, Protocol};
use tandem_index::HnswParams;
use tandem_model::config::{ModelConfig, TrainConfig};
use tandem_model::publish::{feature_schema_hash, publish_model};
use tandem_model::train::{train, TrainInput, TrainReport};
use tandem_model::TwoTower;
use tandem_proto::usertower::v1 as ut;
use tandem_proto::usertower::v1::user_tower_client::UserTowerClient;
use tandem_retrain::candidate::{build_index, history_queries};
use tandem_types::{ModelManifest, ModelVersion};

/// One engagement to record live.
#[derive(Debug, Clone)]
pub struct Fresh {
    pub user: String,
    pub item: String,
    pub ts: i64,
}

pub struct Drift {
    /// The older events, in time order.
    pub seed: EventLog,
    /// The newer events, in time order.
    pub fresh: Vec<Fresh>,
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Generates `cfg` shifted so its last event is about two minutes ago, and splits it in time at
/// `1 − fresh_fraction`.
pub fn drift(cfg: &SynthConfig, fresh_fraction: f64) -> Drift {
    let cfg = SynthConfig {
        start: now_unix() - cfg.days as i64 * 86_400 - 120,
        ..cfg.clone()
    };
    let data = generate(&cfg);
    let log = data.events;
    let order = log.time_order();
    let cut = ((order.len() as f64) * (1.0 - fresh_fraction)).round() as usize;
    let seed = log.subset(&order[..cut]);
    let fresh = order[cut..]
        .iter()
        .map(|&e| {
            let e = e as usize;
            Fresh {
                user: log.users.name(log.user[e]).to_string(),
                item: log.items.name(log.item[e]).to_string(),
                ts: log.ts[e],
            }
        })
        .collect();
    Drift { seed, fresh }
}

/// Writes `log` as the first segment of the user tower's event log in `<root>/events`.
pub fn seed_event_log(root: &Path, log: &EventLog) {
    let dir = root.join("events");
    std::fs::create_dir_all(&dir).expect("events dir");
    let order = log.time_order();
    log.write(&dir.join("segment-000000.csv"), Some(&order), false)
        .expect("seed segment");
}

/// Trains a model on `log` and publishes its index and model as version `version` of `name`.
pub fn publish_trained(
    root: &Path,
    name: &str,
    version: ModelVersion,
    log: &EventLog,
    mcfg: &ModelConfig,
    tcfg: &TrainConfig,
) -> (TwoTower, TrainReport) {
    let input = TrainInput {
        log,
        user_features: None,
        item_features: None,
        validation: Some(Protocol::Global),
    };
    let (model, report) = train(&input, mcfg, tcfg, false).expect("train");
    let queries = history_queries(&model, log, 500).expect("queries");
    let built = build_index(&model, &HnswParams::default(), queries).expect("index");
    let hash = feature_schema_hash(&model);
    built
        .publish(root, name, version, &hash)
        .expect("publish index");
    let meta = ModelManifest {
        dim: mcfg.dim,
        feature_schema_hash: hash,
        data: log.data_range(),
        hyperparameters: serde_json::json!({ "model": mcfg, "train": tcfg }),
        validation: report.validation.clone(),
        train_seconds: report.seconds,
    };
    publish_model(root, name, Some(version), &model, &meta).expect("publish model");
    (model, report)
}

/// Records `events` through the user tower's batch RPC; returns (accepted, rejected).
pub async fn record(url: &str, events: &[Fresh], batch: usize) -> (u64, u64) {
    let mut c = UserTowerClient::connect(url.to_string())
        .await
        .expect("connect user tower");
    let (mut ok, mut bad) = (0, 0);
    for chunk in events.chunks(batch.max(1)) {
        let mut req = tonic::Request::new(ut::EngagementBatch {
            events: chunk
                .iter()
                .map(|e| ut::EngagementEvent {
                    user_id: e.user.clone(),
                    item_id: e.item.clone(),
                    timestamp: e.ts,
                    action: "view".into(),
                    weight: 1.0,
                })
                .collect(),
        });
        req.set_timeout(Duration::from_secs(30));
        let r = c
            .record_engagement_batch(req)
            .await
            .expect("record batch")
            .into_inner();
        ok += r.accepted;
        bad += r.rejected;
    }
    (ok, bad)
}
