//! `tandem tune`: a seeded hyper-parameter search scored only on the validation slice carved
//! from the events it is given (the caller's test split never reaches it).
//!
//! Successive halving: every sampled configuration (the first is the defaults) trains for a few
//! epochs; the best third continue with three times the epochs, and so on, until one rung has
//! trained with the full early-stopping budget or the time budget is spent. Each trial's score
//! is the early-stopping metric of its best epoch on the validation slice. Trials train without
//! the refit (the refit adds no information about a setting, only data).

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tandem_data::{EventLog, FeatureTable, Protocol};
use tandem_model::config::{ModelConfig, Negatives, TrainConfig, UserEncoder};
use tandem_model::train::{train, TrainInput};

use crate::Result;

/// What one configuration scored at one rung.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub id: usize,
    pub rung: usize,
    /// Epoch cap of this rung (early stopping may end sooner).
    pub max_epochs: usize,
    pub model: ModelConfig,
    pub train: TrainConfig,
    /// The early-stopping metric at the best epoch, on the validation slice.
    pub score: f64,
    pub best_epoch: usize,
    pub validation: std::collections::BTreeMap<String, f64>,
    pub seconds: f64,
    /// Set when training failed (the configuration scores −∞).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TuneReport {
    /// The events tuning read (all of them train or validate; nothing else is read).
    pub events: usize,
    pub max_timestamp: i64,
    pub protocol: Protocol,
    pub trials: Vec<Trial>,
    /// Index into `trials` of the winner (its last-rung record).
    pub best: usize,
    /// The defaults' score at the rung where the winner was chosen, for comparison.
    pub default_score: Option<f64>,
    pub seconds: f64,
    /// Whether the time budget ended the search before the last rung.
    pub budget_exhausted: bool,
}

pub struct TuneOptions {
    pub budget: Duration,
    /// Configurations sampled (the first is the base configuration).
    pub trials: usize,
    pub seed: u64,
    pub protocol: Protocol,
    /// Epoch caps of the rungs (the last is the base configuration's own `epochs`).
    pub rungs: Vec<usize>,
}

impl Default for TuneOptions {
    fn default() -> Self {
        TuneOptions {
            budget: Duration::from_secs(20 * 60),
            trials: 9,
            seed: 7,
            protocol: Protocol::User,
            rungs: vec![3, 9, 30],
        }
    }
}

/// One configuration drawn around `base` (the search space of the README).
pub fn sample(
    base: &(ModelConfig, TrainConfig),
    items: usize,
    rng: &mut ChaCha8Rng,
) -> (ModelConfig, TrainConfig) {
    let (mut m, mut t) = base.clone();
    let pick = |rng: &mut ChaCha8Rng, xs: &[f64]| xs[rng.random_range(0..xs.len())];
    t.lr = base.1.lr * pick(rng, &[0.5, 1.0, 2.0]);
    t.dropout = pick(rng, &[0.1, 0.2, 0.3, 0.5]);
    t.temperature = base.1.temperature * pick(rng, &[0.6, 1.0, 2.0]);
    t.target_window = [0, 1, 5, 20][rng.random_range(0..4)];
    t.weight_decay = pick(rng, &[1e-6, 1e-5, 1e-4]);
    if items <= tandem_model::config::FULL_SOFTMAX_MAX_ITEMS {
        t.negatives = [Negatives::Full, Negatives::InBatch][rng.random_range(0..2)];
    }
    let dim = [32usize, 64, 128][rng.random_range(0..3)];
    m.dim = dim;
    m.id_dim = dim;
    m.history = [20usize, 50, 100][rng.random_range(0..3)];
    m.user_encoder =
        [UserEncoder::Mean, UserEncoder::Mean, UserEncoder::Attention][rng.random_range(0..3)];
    (m, t)
}

/// Runs the search; `progress(done, total, message)` is called after every trial.
pub fn tune(
    log: &EventLog,
    user_features: Option<&FeatureTable>,
    item_features: Option<&FeatureTable>,
    base: &(ModelConfig, TrainConfig),
    opts: &TuneOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<TuneReport> {
    let started = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let n = opts.trials.max(1);
    let mut configs = vec![base.clone()];
    while configs.len() < n {
        configs.push(sample(base, log.items.len(), &mut rng));
    }
    // Planned trainings over all rungs, for the progress total.
    let mut total = 0;
    let mut alive = n;
    for _ in &opts.rungs {
        total += alive;
        alive = alive.div_ceil(3);
    }
    let mut trials: Vec<Trial> = Vec::new();
    let mut live: Vec<usize> = (0..n).collect();
    let mut budget_exhausted = false;
    let mut last_rung = 0;
    'rungs: for (rung, &cap) in opts.rungs.iter().enumerate() {
        let mut scored: Vec<(usize, f64)> = Vec::new();
        for &id in &live {
            if started.elapsed() >= opts.budget && !scored.is_empty() {
                budget_exhausted = true;
                break 'rungs;
            }
            let (m, mut t) = configs[id].clone();
            t.epochs = cap.min(base.1.epochs.max(1));
            t.refit = false;
            let trial_start = Instant::now();
            let input = TrainInput {
                log,
                user_features,
                item_features,
                validation: Some(opts.protocol),
            };
            let outcome = train(&input, &m, &t, false);
            let (score, best_epoch, validation, error) = match outcome {
                Ok((_, r)) => {
                    let s = score_of(&t.early_stopping_metric, &r.validation);
                    (s, r.best_epoch, r.validation, None)
                }
                Err(e) => (
                    f64::NEG_INFINITY,
                    0,
                    Default::default(),
                    Some(e.to_string()),
                ),
            };
            trials.push(Trial {
                id,
                rung,
                max_epochs: t.epochs,
                model: m,
                train: t,
                score,
                best_epoch,
                validation,
                seconds: trial_start.elapsed().as_secs_f64(),
                error,
            });
            scored.push((id, score));
            progress(
                trials.len(),
                total,
                &format!("rung {rung} trial {id}: {score:.4}"),
            );
        }
        last_rung = rung;
        scored.sort_by(|a, b| b.1.total_cmp(&a.1));
        live = scored
            .iter()
            .take(scored.len().div_ceil(3))
            .map(|&(id, _)| id)
            .collect();
    }
    // The winner: the best score among the records of the deepest rung reached.
    let deepest = trials.iter().map(|t| t.rung).max().unwrap_or(last_rung);
    let best = trials
        .iter()
        .enumerate()
        .filter(|(_, t)| t.rung == deepest)
        .max_by(|a, b| a.1.score.total_cmp(&b.1.score))
        .map(|(i, _)| i)
        .unwrap_or(0);
    let default_score = trials
        .iter()
        .filter(|t| t.id == 0)
        .max_by_key(|t| t.rung)
        .map(|t| t.score);
    Ok(TuneReport {
        events: log.len(),
        max_timestamp: log.ts.iter().copied().max().unwrap_or(0),
        protocol: opts.protocol,
        trials,
        best,
        default_score,
        seconds: started.elapsed().as_secs_f64(),
        budget_exhausted,
    })
}

fn score_of(metric: &str, values: &std::collections::BTreeMap<String, f64>) -> f64 {
    metric
        .split('+')
        .map(|m| values.get(m.trim()).copied().unwrap_or(f64::NEG_INFINITY))
        .sum()
}
