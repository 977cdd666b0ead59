//! The CPU-bound half of a cycle, in named steps: read the window, load the champion, train the
//! candidate, score both on the same held-out slice, build the candidate's index and apply the
//! gate. Runs on a blocking thread.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tandem_data::{EventLog, FeatureTable, Protocol, Split};
use tandem_index::HnswParams;
use tandem_model::eval::{metrics, EvalSet, ModelRanker, Recommender};
use tandem_model::train::{train, TrainInput};
use tandem_model::TwoTower;
use tandem_pipeline::{history_queries, max_norm_error, Built};
use tandem_types::{DataRange, ModelVersion, INDEXES, MODELS};

use crate::canary::ProbeUser;
use crate::config::RetrainConfig;
use crate::cycle::{CycleOptions, Fault};
use crate::gate::{self, Decision, Evidence};
use crate::{Result, RetrainError};

/// Everything the CPU-bound part of a cycle produces.
pub(crate) struct Prepared {
    pub model: TwoTower,
    pub built: Built,
    pub train_data: DataRange,
    pub heldout_events: usize,
    /// The newest event of the window (the held-out slice included).
    pub seen_until: i64,
    pub candidate_metrics: BTreeMap<String, f64>,
    pub champion_metrics: Option<BTreeMap<String, f64>>,
    pub gate: Vec<Decision>,
    pub probes: Vec<ProbeUser>,
    pub train_seconds: f64,
    pub validation: BTreeMap<String, f64>,
}

pub(crate) enum Prep {
    Skip(String),
    Ready(Box<Prepared>),
}

/// The events of the last `days` before the newest one.
pub fn window(log: &EventLog, days: f64) -> EventLog {
    let newest = log.ts.iter().copied().max().unwrap_or(0);
    let from = newest - (days * 86_400.0) as i64;
    let idx: Vec<u32> = (0..log.len() as u32)
        .filter(|&e| log.ts[e as usize] >= from)
        .collect();
    log.subset(&idx)
}

/// The most recent `fraction` of `window` (by time) held out; the rest is for training.
pub fn holdout(window: &EventLog, fraction: f64) -> Result<Split> {
    let order = window.time_order();
    let n_test = ((order.len() as f64) * fraction).round() as usize;
    if n_test == 0 || n_test >= order.len() {
        return Err(RetrainError::TooFewEvents {
            events: order.len(),
        });
    }
    Ok(Split {
        train: order[..order.len() - n_test].to_vec(),
        test: order[order.len() - n_test..].to_vec(),
    })
}

/// The held-out users the gate scores: a seeded sample of at most `eval_users`.
pub fn eval_set(window: &EventLog, split: &Split, cfg: &RetrainConfig) -> EvalSet {
    EvalSet::new(window, split).sample(cfg.window.eval_users, cfg.train.seed)
}

/// The serving model and the newest event it has seen: a retrained version records the newest
/// event its cycle saw (held-out slice included); other versions saw their training data.
fn load_champion(opts: &CycleOptions, v: ModelVersion) -> Result<(TwoTower, i64)> {
    let dir = tandem_artifact::version_dir(&opts.artifacts, MODELS, &opts.model, v);
    let manifest = tandem_model::model::open(&dir)?;
    let seen = manifest.meta.hyperparameters["seen_until"]
        .as_i64()
        .unwrap_or(manifest.meta.data.max_timestamp);
    Ok((TwoTower::load(&dir)?, seen))
}

/// The candidate's index layout: `[index] shards`, else the champion's, else whole.
fn shards(opts: &CycleOptions, cfg: &RetrainConfig, champion: Option<ModelVersion>) -> Result<u32> {
    if let Some(s) = cfg.index.shards {
        return Ok(s.max(1));
    }
    let Some(v) = champion else { return Ok(1) };
    let dir = tandem_artifact::version_dir(&opts.artifacts, INDEXES, &opts.model, v);
    if !dir.exists() {
        return Ok(1);
    }
    let m: tandem_artifact::Manifest<tandem_index::artifact::IndexManifest> =
        tandem_artifact::open(&dir)?;
    Ok(m.meta.shard_count())
}

fn read_features(path: &Option<PathBuf>, key: &str) -> Result<Option<FeatureTable>> {
    Ok(match path {
        Some(p) => Some(FeatureTable::read(p, key, None)?),
        None => None,
    })
}

/// Reads the window, trains, evaluates candidate and champion, builds the index and applies the
/// gate.
pub(crate) fn prepare(
    opts: &CycleOptions,
    cfg: &RetrainConfig,
    log: EventLog,
    champion: Option<ModelVersion>,
) -> Result<Prep> {
    let window = window(&log, cfg.window.days);
    let newest = window.ts.iter().copied().max().unwrap_or(0);
    let champ = champion.map(|v| load_champion(opts, v)).transpose()?;
    if let Some((_, seen_until)) = &champ {
        let fresh = window.ts.iter().filter(|&&t| t > *seen_until).count();
        if fresh < cfg.window.min_new_events {
            return Ok(Prep::Skip(format!(
                "{fresh} events newer than the champion's data (need {})",
                cfg.window.min_new_events
            )));
        }
    }

    let split = holdout(&window, cfg.window.holdout_fraction)?;
    let mut train_log = window.subset(&split.train);
    if opts.fault == Some(Fault::ShuffleTrainItems) {
        shuffle_items(&mut train_log, cfg.train.seed);
    }
    let user_features = read_features(&opts.user_features, "user_id")?;
    let item_features = read_features(&opts.item_features, "item_id")?;
    if opts.fault == Some(Fault::CrashTraining) {
        panic!("fault injected: crash-training");
    }
    let input = TrainInput {
        log: &train_log,
        user_features: user_features.as_ref(),
        item_features: item_features.as_ref(),
        validation: Some(Protocol::Global),
    };
    let (model, report) = train(&input, &cfg.model, &cfg.train, opts.training_progress)?;

    let set = eval_set(&window, &split, cfg);
    let candidate_metrics = score(&model, &window, &set)?;
    let champion_metrics = champ
        .as_ref()
        .map(|(m, _)| score(m, &window, &set))
        .transpose()?;
    let shards = shards(opts, cfg, champion)?;
    let (built, gate) = index_and_gate(
        &model,
        &window,
        cfg,
        shards,
        &candidate_metrics,
        &champion_metrics,
    )?;
    Ok(Prep::Ready(Box::new(Prepared {
        probes: probes(&window, &set, cfg.canary.probe_users),
        model,
        built,
        train_data: train_log.data_range(),
        heldout_events: split.test.len(),
        seen_until: newest,
        candidate_metrics,
        champion_metrics,
        gate,
        train_seconds: report.seconds,
        validation: report.validation,
    })))
}

/// A model's metrics on the held-out users (both models are scored on the very same set).
fn score(model: &TwoTower, window: &EventLog, set: &EvalSet) -> Result<BTreeMap<String, f64>> {
    let ranker = ModelRanker {
        model,
        log: window,
        items: None,
    };
    Ok(metrics(set, &ranker.recommend(set, 100)?).values)
}

/// Builds the candidate's index (its recall measured on real user histories) and applies the
/// gate to everything measured.
fn index_and_gate(
    model: &TwoTower,
    window: &EventLog,
    cfg: &RetrainConfig,
    shards: u32,
    candidate: &BTreeMap<String, f64>,
    champion: &Option<BTreeMap<String, f64>>,
) -> Result<(Built, Vec<Decision>)> {
    let queries = history_queries(model, window, 1000)?;
    let user_norm_error = max_norm_error(&queries.0, cfg.model.dim);
    let built = Built::build(model, &HnswParams::default(), queries, shards)?;
    let norm_error = if user_norm_error.is_nan() || built.item_norm_error().is_nan() {
        f64::NAN
    } else {
        user_norm_error.max(built.item_norm_error())
    };
    let gate = gate::evaluate(
        &cfg.gate,
        &Evidence {
            candidate: candidate.clone(),
            champion: champion.clone(),
            ann_recall_at_10: built.ann_recall_at_10(),
            max_norm_error: norm_error,
        },
    );
    Ok((built, gate))
}

/// The canary's probe users: held-out users with the items that count as hits.
fn probes(window: &EventLog, set: &EvalSet, n: usize) -> Vec<ProbeUser> {
    set.users
        .iter()
        .zip(&set.truth)
        .take(n)
        .map(|(&u, truth)| ProbeUser {
            user: window.users.name(u).to_string(),
            targets: truth
                .iter()
                .map(|&i| window.items.name(i).to_string())
                .collect(),
        })
        .collect()
}

/// Permutes the item ids of every event (seeded): same popularity, no real user–item signal.
fn shuffle_items(log: &mut EventLog, seed: u64) {
    let n = log.items.len();
    let mut perm: Vec<u32> = (0..n as u32).collect();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for i in (1..n).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        perm.swap(i, (s % (i as u64 + 1)) as usize);
    }
    for it in &mut log.item {
        *it = perm[*it as usize];
    }
}
