//! Training: softmax retrieval over causal examples.
//!
//! Every train event `(u, i, t)` (with `Targets::New`, only a user's first engagement with `i`)
//! is one example: the user tower sees `u`'s features, the L items `u` engaged with before it
//! (most recent first), optionally a summary of a longer history, and the time context of `t`;
//! the item tower sees `i`. The softmax runs over the whole catalogue (`full`), or over the
//! batch's other positives (`in-batch`, logQ-corrected) plus uniform corpus samples (`mixed`);
//! items the user engaged with before are left out of its negatives (`mask_seen`).
//!
//! With validation enabled, the events given are split by the protocol; the model trains on the
//! train side and early stopping on the validation side picks the epoch count. Then (`refit`)
//! a fresh model trains on every event — the validation slice holds each user's most recent,
//! most informative events — for that many epochs, and that model is returned.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;
use tandem_data::{EventLog, FeatureTable, Protocol, Split};

use crate::config::{LogQ, ModelConfig, Negatives, Targets, TrainConfig, UserEncoder};
use crate::encode::{EntityVocab, FeatureSchema};
use crate::eval::{metrics, EvalSet, ModelRanker, Recommender};
use crate::logq::{estimator, ExactCounts, FrequencyEstimator};
use crate::loss::{full_softmax_loss, sampled_bias, sampled_softmax_loss_biased, Bias};
use crate::model::{host_copy, push_distinct, ItemModel, Tensors, TwoTower, UserModel};
use crate::params::{AdamW, RowPlanner, SparseTable, Table};
use crate::sequence::gap_bucket;
use crate::towers::{
    context, l2_normalize, ItemInput, ItemTables, ItemTower, Linear, Mlp, UserInput, UserTables,
    UserTower, WindowInput, CONTEXT_DIM,
};
use crate::{ModelError, Result};

/// What to train on.
pub struct TrainInput<'a> {
    pub log: &'a EventLog,
    pub user_features: Option<&'a FeatureTable>,
    pub item_features: Option<&'a FeatureTable>,
    /// Carve a validation slice by this protocol; `None` trains on everything for a fixed number
    /// of epochs.
    pub validation: Option<Protocol>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub loss: f64,
    pub examples_per_sec: f64,
    pub seconds: f64,
    pub validation: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub examples: usize,
    pub validation_users: usize,
    /// The batch size and target window used (auto settings resolved).
    pub batch_size: usize,
    pub target_window: usize,
    /// The negatives actually used (`auto` resolved by catalogue size).
    pub negatives: Negatives,
    /// The epoch early stopping kept (the refit trains this many epochs on every event).
    pub best_epoch: usize,
    pub validation: BTreeMap<String, f64>,
    pub epochs: Vec<EpochReport>,
    /// The refit's epochs, when the published model is the refit.
    pub refit_epochs: Option<Vec<EpochReport>>,
    pub seconds: f64,
}

/// One example: (log user index, position in that user's train sequence).
pub(crate) type Example = (u32, u32);

pub(crate) struct Trainer {
    pub(crate) dev: Device,
    /// Per-part step times, when profiling (`tandem bench train --profile`).
    pub(crate) profile: Option<StepPhases>,
    cfg: ModelConfig,
    tcfg: TrainConfig,
    /// Batch preparation (absent only while an epoch runs it on its own thread).
    feed: Option<Feeder>,
    user_schema: FeatureSchema,
    item_schema: FeatureSchema,
    user_id: SparseTable,
    user_feat: SparseTable,
    item_id: SparseTable,
    item_feat: SparseTable,
    user_tower: UserTower,
    item_tower: ItemTower,
    log_tau: Var,
    dense_opt: DenseAdamW,
    sparse_opt: AdamW,
    step: u64,
    /// The negatives in use (`auto` resolved by catalogue size).
    negatives: Negatives,
    /// Dropout masks on the CPU.
    rng: ChaCha8Rng,
    /// Prepare batches ahead on a thread of their own (on a GPU; tests force it on a CPU).
    ahead: bool,
}

/// Everything preparing a batch reads and draws: vocabularies, the logQ estimator, id dropout
/// and target draws with a generator of their own. On a GPU it runs on its own thread, batches
/// ahead of the steps ([`Trainer::run_steps`]); on a CPU, inline. Either way the same batches
/// come out in the same order, so a seed gives the same weights.
struct Feeder {
    cfg: ModelConfig,
    tcfg: TrainConfig,
    users: EntityVocab,
    items: EntityVocab,
    estimator: Option<Box<dyn FrequencyEstimator>>,
    streaming: bool,
    negatives: Negatives,
    /// Transformer user tower: batches are windows.
    windows: bool,
    rng: ChaCha8Rng,
    /// Every item's tower input (`full` negatives score the whole catalogue each step).
    all_items: Option<ItemInput>,
    /// Each table's row planner: the step's rows found and its ids renumbered here, so the step
    /// only gathers.
    planners: [RowPlanner; 4],
}

/// The rows a step gathers from each table (distinct, increasing; row 0 always among them).
struct StepRows {
    user_id: Vec<u32>,
    user_feat: Vec<u32>,
    item_id: Vec<u32>,
    item_feat: Vec<u32>,
}

/// A batch ready for a step: its inputs and the candidates' inputs, their ids renumbered to
/// the leaf rows of `rows`, and (sampled negatives) the loss's column biases and masks.
struct Ready {
    batch: Batch,
    ix: ItemInput,
    rows: StepRows,
    bias: Option<Bias>,
    /// Time spent preparing it.
    encode_ms: f64,
}

/// Batches a GPU's feeder may run ahead of the steps.
const AHEAD: usize = 2;

/// Per log user: (item id of this version, timestamp, weight) of each train event, time order.
pub type Sequences = Vec<Vec<(u32, i64, f32)>>;

/// A batch's user-side input: one row per example, or (transformer) windows whose valid
/// positions are the rows.
enum UserSide {
    Rows(UserInput),
    Windows { x: WindowInput, rows: Vec<u32> },
}

impl UserSide {
    /// Every id the user tower reads from each table: (users, feature slots, items).
    fn ids_mut(&mut self) -> (&mut [u32], &mut [u32], [&mut [u32]; 2]) {
        match self {
            UserSide::Rows(x) => (&mut x.users, &mut x.slots, [&mut x.history, &mut x.long]),
            UserSide::Windows { x, .. } => (&mut x.users, &mut x.slots, [&mut x.seq, &mut x.long]),
        }
    }
}

/// Inverted dropout with probability `p`. On the CPU the masks come from the seeded RNG (so a
/// seed still fixes the run); on a GPU they are drawn there, from the device generator the
/// trainer seeded, instead of being drawn on the host and copied over every step.
fn dropout(x: &Tensor, p: f64, rng: &mut ChaCha8Rng) -> candle_core::Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 / (1.0 - p) as f32;
    if !x.device().is_cpu() {
        let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
        let mask = (u.ge(p as f32)?.to_dtype(x.dtype())? * keep as f64)?;
        return x.mul(&mask);
    }
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect();
    x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)
}

/// Sorted distinct items of `before` (what to leave out of negatives), or nothing when seen
/// items are not masked.
fn seen_items(mask_seen: bool, before: &[(u32, i64, f32)]) -> Vec<u32> {
    if !mask_seen {
        return Vec::new();
    }
    let mut s: Vec<u32> = before.iter().map(|e| e.0).collect();
    s.sort_unstable();
    s.dedup();
    s
}

/// One batch, encoded.
struct Batch {
    user: UserSide,
    targets: Vec<u32>,
    weights: Vec<f32>,
    /// Per row, the sorted distinct items the user engaged with before the example (empty
    /// unless `mask_seen`; sampled negatives fold them into the loss's masks as the batch is
    /// prepared).
    seen: Vec<Vec<u32>>,
}

/// Everything training reads, built once: vocabularies and each side's per-user sequences.
struct Prepared<'a> {
    log: &'a EventLog,
    users: EntityVocab,
    items: EntityVocab,
    user_vid: Vec<u32>,
    /// Train-side sequences (all events when there is no validation slice).
    train: Sequences,
    /// Every event's sequences (for the refit), when a validation slice was carved.
    all: Option<Sequences>,
    validation: Option<EvalSet>,
}

fn sequences(log: &EventLog, events: &[u32], item_vid: &[u32]) -> Sequences {
    let mut seqs: Sequences = vec![Vec::new(); log.users.len()];
    for &e in events {
        let e = e as usize;
        seqs[log.user[e] as usize].push((item_vid[log.item[e] as usize], log.ts[e], log.weight[e]));
    }
    seqs
}

impl<'a> Prepared<'a> {
    fn new(input: &TrainInput<'a>, cfg: &ModelConfig, tcfg: &TrainConfig) -> Result<Self> {
        let log = input.log;
        if log.is_empty() {
            return Err(ModelError::Invalid("no events to train on".into()));
        }
        let users = EntityVocab::build(
            log.users.names().iter().map(String::as_str),
            input.user_features,
            cfg.max_multi,
        );
        let items = EntityVocab::build(
            log.items.names().iter().map(String::as_str),
            input.item_features,
            cfg.max_multi,
        );
        let user_vid: Vec<u32> = log.users.names().iter().map(|s| users.get(s)).collect();
        let item_vid: Vec<u32> = log.items.names().iter().map(|s| items.get(s)).collect();
        let (train, all, validation) = match input.validation {
            Some(p) => {
                let split = Split::new(log, p);
                let set = EvalSet::new(log, &split).sample(tcfg.max_validation_users, tcfg.seed);
                let all = tcfg
                    .refit
                    .then(|| sequences(log, &log.time_order(), &item_vid));
                (sequences(log, &split.train, &item_vid), all, Some(set))
            }
            None => (sequences(log, &log.time_order(), &item_vid), None, None),
        };
        Ok(Prepared {
            log,
            users,
            items,
            user_vid,
            train,
            all,
            validation,
        })
    }
}

/// The training examples of `seqs`: every position, or (with `Targets::New`) only a user's first
/// engagement with each item.
fn examples(seqs: &Sequences, targets: Targets) -> Vec<Example> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (u, s) in seqs.iter().enumerate() {
        seen.clear();
        for (p, &(item, _, _)) in s.iter().enumerate() {
            if seen.insert(item) || targets == Targets::All {
                out.push((u as u32, p as u32));
            }
        }
    }
    out
}

/// `tcfg` with its data-dependent settings (0 = auto) resolved on the training sequences:
///
/// - batch size: about 250 optimiser steps per epoch (a power of two in 64..=1024), so small
///   logs still take enough steps per epoch for early stopping to see the model learn;
/// - target window: a fifth of the median user's events (the stretch of future the per-user
///   protocol scores), in 1..=20.
pub fn resolve(tcfg: &TrainConfig, seqs: &Sequences) -> TrainConfig {
    let mut t = tcfg.clone();
    if t.batch_size == 0 {
        let events: usize = seqs.iter().map(Vec::len).sum();
        let per_step = (events as f64 / 250.0).max(1.0);
        t.batch_size = (2f64.powf(per_step.log2().round()) as usize).clamp(64, 1024);
    }
    if t.target_window == 0 {
        let mut lens: Vec<usize> = seqs.iter().map(Vec::len).filter(|&n| n > 0).collect();
        lens.sort_unstable();
        let median = lens.get(lens.len() / 2).copied().unwrap_or(1);
        t.target_window = ((0.2 * median as f64).round() as usize).clamp(1, 20);
    }
    t
}

/// The transformer's training windows `(u, a)`: consecutive stretches of L inputs covering every
/// position that has a next event.
fn windows(seqs: &Sequences, l: usize) -> Vec<Example> {
    let mut out = Vec::new();
    for (u, s) in seqs.iter().enumerate() {
        let mut a = 0;
        while a + 1 < s.len() {
            out.push((u as u32, a as u32));
            a += l;
        }
    }
    out
}

/// The early-stopping score of validation metrics: one metric or a `+`-separated sum.
fn score_of(metric: &str, values: &BTreeMap<String, f64>) -> Result<f64> {
    metric
        .split('+')
        .map(|m| {
            values
                .get(m.trim())
                .copied()
                .ok_or_else(|| ModelError::Invalid(format!("unknown early-stopping metric {m:?}")))
        })
        .sum()
}

pub fn train(
    input: &TrainInput,
    cfg: &ModelConfig,
    tcfg: &TrainConfig,
    progress: bool,
) -> Result<(TwoTower, TrainReport)> {
    let started = Instant::now();
    let data = Prepared::new(input, cfg, tcfg)?;
    let tcfg = &resolve(tcfg, &data.train);
    let (model, mut report) = run(
        &data,
        &data.train,
        data.validation.as_ref(),
        cfg,
        tcfg,
        tcfg.epochs,
        progress,
    )?;
    report.batch_size = tcfg.batch_size;
    report.target_window = tcfg.target_window;
    let model = match &data.all {
        // The refit: the epoch count early stopping chose, on every event, from scratch.
        Some(all) if report.best_epoch > 0 => {
            if progress {
                eprintln!(
                    "refit: {} epoch(s) on all {} events",
                    report.best_epoch,
                    input.log.len()
                );
            }
            let (refit, refit_report) =
                run(&data, all, None, cfg, tcfg, report.best_epoch, progress)?;
            report.refit_epochs = Some(refit_report.epochs);
            refit
        }
        _ => model,
    };
    report.seconds = started.elapsed().as_secs_f64();
    Ok((model, report))
}

/// Trains a fresh model on `seqs` for up to `epochs`; with a validation set, early stopping keeps
/// the best epoch.
fn run(
    data: &Prepared,
    seqs: &Sequences,
    validation: Option<&EvalSet>,
    cfg: &ModelConfig,
    tcfg: &TrainConfig,
    epochs: usize,
    progress: bool,
) -> Result<(TwoTower, TrainReport)> {
    let targets = examples(seqs, tcfg.targets);
    // The transformer trains on windows (every position of a window is an example); the other
    // encoders on single examples.
    let (mut examples, per_batch) = if cfg.user_encoder == UserEncoder::Transformer {
        let l = cfg.history.max(1);
        (windows(seqs, l), (tcfg.batch_size / l).max(1))
    } else {
        (targets.clone(), tcfg.batch_size)
    };
    if examples.is_empty() {
        return Err(ModelError::Invalid(
            "no training events left after carving the validation slice".into(),
        ));
    }
    let mut t = Trainer::new(cfg, tcfg, data.users.clone(), data.items.clone())?;
    if tcfg.logq == LogQ::Exact {
        // Exact counts are known before training: count the whole train stream once.
        let feed = t.feeder_mut();
        let mut exact = ExactCounts::new(feed.items.len());
        targets
            .iter()
            .for_each(|&(u, p)| exact.observe(seqs[u as usize][p as usize].0));
        feed.estimator = Some(Box::new(exact));
        feed.streaming = false;
    }
    let mut report = TrainReport {
        examples: targets.len(),
        validation_users: validation.map_or(0, |v| v.users.len()),
        batch_size: tcfg.batch_size,
        target_window: tcfg.target_window,
        negatives: t.negatives,
        best_epoch: 0,
        validation: BTreeMap::new(),
        epochs: Vec::new(),
        refit_epochs: None,
        seconds: 0.0,
    };
    let mut best: Option<(f64, TwoTower)> = None;
    let mut shuffle_rng = ChaCha8Rng::seed_from_u64(tcfg.seed.wrapping_add(1));
    let batches = examples.len().div_ceil(per_batch);
    let epochs = epochs.max(1);
    for epoch in 1..=epochs {
        for i in (1..examples.len()).rev() {
            examples.swap(i, shuffle_rng.random_range(0..=i));
        }
        let bar = if progress {
            ProgressBar::new(batches as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} (eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{epochs}"));
        let epoch_start = Instant::now();
        let mut losses = Losses::new(&t.dev, epoch);
        t.run_steps(
            examples.chunks(per_batch),
            seqs,
            &data.user_vid,
            |k, loss| {
                if let Some(loss) = loss {
                    losses.push(k, loss)?;
                }
                let done = targets.len() as f64 * (k + 1) as f64 / batches as f64;
                bar.set_message(format!(
                    "loss {:.4} · {:.0} ex/s",
                    losses.mean(),
                    done / epoch_start.elapsed().as_secs_f64().max(1e-9)
                ));
                bar.inc(1);
                Ok(())
            },
        )?;
        losses.flush()?;
        bar.finish_and_clear();
        let seconds = epoch_start.elapsed().as_secs_f64();
        let snapshot = t.snapshot()?;
        let mut epoch_report = EpochReport {
            epoch,
            loss: losses.mean(),
            examples_per_sec: targets.len() as f64 / seconds.max(1e-9),
            seconds,
            validation: BTreeMap::new(),
        };
        let score = match validation {
            Some(set) => {
                let ranker = ModelRanker {
                    model: &snapshot,
                    log: data.log,
                    items: None,
                };
                epoch_report.validation = metrics(set, &ranker.recommend(set, 100)?).values;
                score_of(&tcfg.early_stopping_metric, &epoch_report.validation)?
            }
            // Without validation the last epoch is kept.
            None => epoch as f64,
        };
        tracing::info!(epoch, loss = epoch_report.loss, ex_per_s = epoch_report.examples_per_sec, ?epoch_report.validation, "epoch done");
        if progress {
            let val = if validation.is_some() {
                format!(" · val {} {score:.4}", tcfg.early_stopping_metric)
            } else {
                String::new()
            };
            eprintln!(
                "epoch {epoch}/{epochs}: loss {:.4} · {:.0} ex/s{val}",
                epoch_report.loss, epoch_report.examples_per_sec
            );
        }
        report.epochs.push(epoch_report);
        if best.as_ref().is_none_or(|(s, _)| score > *s) {
            best = Some((score, snapshot));
            report.best_epoch = epoch;
        } else if epoch - report.best_epoch >= tcfg.patience.max(1) {
            break;
        }
    }
    let (_, model) = best.ok_or_else(|| ModelError::Invalid("no epoch completed".into()))?;
    report.validation = report.epochs[report.best_epoch - 1].validation.clone();
    Ok((model, report))
}

/// Wall time spent in each part of the training steps, summed over `steps` (`tandem bench
/// train --profile`). The device is synchronised at every boundary, so a GPU's work counts in
/// the part that queued it (and nothing overlaps, unlike an unprofiled step).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepPhases {
    /// Waiting for the batch: encoding it inline on a CPU; on a GPU, where batches are encoded
    /// ahead on another thread, only the wait for one not yet ready.
    pub prepare_ms: f64,
    /// Preparing the batch (histories, targets, candidates, logQ, the loss's masks, the tables'
    /// row plans), wherever it ran: on a GPU this overlaps the steps.
    pub encode_ms: f64,
    /// Gathering the planned table rows into leaves.
    pub gather_ms: f64,
    /// Towers and loss: the sum of the next three.
    pub forward_ms: f64,
    /// The user tower (inputs, pooling, dropout, MLP).
    pub user_ms: f64,
    /// The item tower.
    pub item_ms: f64,
    /// Logits and the softmax loss (with `full` negatives, also the loss's mask lists; sampled
    /// negatives have theirs built with the batch).
    pub loss_ms: f64,
    pub backward_ms: f64,
    /// Dense AdamW and the sparse row updates.
    pub update_ms: f64,
    pub steps: usize,
}

impl StepPhases {
    /// Milliseconds per step of each part.
    pub fn per_step(&self) -> StepPhases {
        let n = self.steps.max(1) as f64;
        StepPhases {
            prepare_ms: self.prepare_ms / n,
            encode_ms: self.encode_ms / n,
            gather_ms: self.gather_ms / n,
            forward_ms: self.forward_ms / n,
            user_ms: self.user_ms / n,
            item_ms: self.item_ms / n,
            loss_ms: self.loss_ms / n,
            backward_ms: self.backward_ms / n,
            update_ms: self.update_ms / n,
            steps: self.steps,
        }
    }
}

/// The dense layers' AdamW: candle's on a CPU; on a GPU one fused kernel per variable.
enum DenseAdamW {
    Candle(candle_nn::AdamW),
    #[cfg(feature = "cuda")]
    Fused(crate::cuda::FusedAdamW),
}

impl DenseAdamW {
    fn new(vars: Vec<Var>, opt: AdamW, dev: &Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if dev.is_cuda() {
            return Ok(DenseAdamW::Fused(crate::cuda::FusedAdamW::new(vars, opt)?));
        }
        let _ = dev;
        Ok(DenseAdamW::Candle(candle_nn::AdamW::new(vars, opt.into())?))
    }

    /// Step `step` (from 1) on the gradients in `grads`.
    fn step(&mut self, grads: &candle_core::backprop::GradStore, step: u64) -> Result<()> {
        match self {
            DenseAdamW::Candle(opt) => opt.step(grads)?,
            #[cfg(feature = "cuda")]
            DenseAdamW::Fused(opt) => opt.step(grads, step)?,
        }
        let _ = step;
        Ok(())
    }
}

/// Laps of a step's parts, when profiling.
struct Laps {
    dev: Option<Device>,
    at: Instant,
}

impl Laps {
    fn new(profiling: bool, dev: &Device) -> Self {
        Laps {
            dev: profiling.then(|| dev.clone()),
            at: Instant::now(),
        }
    }

    /// Milliseconds since the last lap, once the device finished what was queued (0 when not
    /// profiling).
    fn lap(&mut self) -> Result<f64> {
        let Some(dev) = &self.dev else {
            return Ok(0.0);
        };
        dev.synchronize()?;
        let now = Instant::now();
        let ms = (now - self.at).as_secs_f64() * 1e3;
        self.at = now;
        Ok(ms)
    }
}

/// An epoch's step losses, read back from the training device in groups: on a GPU, reading
/// each step's loss would make the host wait for the step to finish before preparing the next
/// batch, where it can prepare it while the GPU still works.
struct Losses {
    epoch: usize,
    /// Losses not read yet, with their batch numbers.
    pending: Vec<(usize, Tensor)>,
    /// Read back once this many are pending.
    every: usize,
    sum: f64,
    count: usize,
}

impl Losses {
    fn new(dev: &Device, epoch: usize) -> Self {
        Losses {
            epoch,
            pending: Vec::new(),
            every: if dev.is_cpu() { 1 } else { 32 },
            sum: 0.0,
            count: 0,
        }
    }

    fn push(&mut self, batch: usize, loss: Tensor) -> Result<()> {
        self.pending.push((batch, loss));
        if self.pending.len() >= self.every {
            self.flush()?;
        }
        Ok(())
    }

    /// Reads the pending losses; a non-finite one ends training with an error.
    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let ts: Vec<&Tensor> = self.pending.iter().map(|(_, t)| t).collect();
        let values = Tensor::stack(&ts, 0)?.to_vec1::<f32>()?;
        for ((k, _), v) in self.pending.iter().zip(values) {
            if !v.is_finite() {
                return Err(ModelError::Invalid(format!(
                    "loss became {v} at epoch {}, batch {k}: lower --lr",
                    self.epoch
                )));
            }
            self.sum += v as f64;
            self.count += 1;
        }
        self.pending.clear();
        Ok(())
    }

    /// Mean of the losses read so far.
    fn mean(&self) -> f64 {
        self.sum / self.count.max(1) as f64
    }
}

impl Feeder {
    /// Prepares `batch` for a step: encodes it, draws the candidates, builds the loss's masks
    /// and plans the table rows.
    fn prepare(&mut self, batch: &[Example], seqs: &Sequences, user_vid: &[u32]) -> Result<Ready> {
        let started = Instant::now();
        let mut batch = if self.windows {
            self.encode_windows(batch, seqs, user_vid)
        } else {
            self.encode(batch, seqs, user_vid)
        };
        let (mut ix, bias) = if batch.targets.is_empty() {
            (ItemInput::default(), None)
        } else if let Some(all) = &self.all_items {
            (all.clone(), None)
        } else {
            let (cand_ids, ix, log_q) = self.sampled_candidates(&batch.targets);
            let seen = self.tcfg.mask_seen.then_some(&batch.seen[..]);
            let bias = sampled_bias(&log_q, &batch.targets, &cand_ids, seen);
            batch.seen = Vec::new();
            (ix, Some(bias))
        };
        let rows = if batch.targets.is_empty() {
            StepRows {
                user_id: Vec::new(),
                user_feat: Vec::new(),
                item_id: Vec::new(),
                item_feat: Vec::new(),
            }
        } else {
            let [user_id, user_feat, item_id, item_feat] = &mut self.planners;
            let (users, slots, [recent, long]) = batch.user.ids_mut();
            StepRows {
                user_id: user_id.plan(&mut [users])?,
                user_feat: user_feat.plan(&mut [slots])?,
                item_id: item_id.plan(&mut [recent, long, &mut ix.items])?,
                item_feat: item_feat.plan(&mut [&mut ix.slots])?,
            }
        };
        Ok(Ready {
            batch,
            ix,
            rows,
            bias,
            encode_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// Encodes a batch: user inputs with id dropout, targets, weights and (for masking) what
    /// each row's user had seen.
    fn encode(&mut self, batch: &[Example], seqs: &Sequences, user_vid: &[u32]) -> Batch {
        let b = batch.len();
        let l = self.cfg.history;
        let drop = self.tcfg.id_dropout;
        let mut ux = UserInput::default();
        let mut targets = Vec::with_capacity(b);
        let mut weights = Vec::with_capacity(b);
        let mut scratch = HashSet::new();
        let window = self.tcfg.target_window.max(1);
        for &(u, p) in batch {
            let seq = &seqs[u as usize];
            let (_, ts, _) = seq[p as usize];
            let q = if window > 1 {
                let end = (p as usize + window).min(seq.len());
                self.pick_target(seq, p as usize, end)
            } else {
                p as usize
            };
            let (item, _, w) = seq[q];
            let uid = user_vid[u as usize];
            ux.users.push(if self.rng.random::<f64>() < drop {
                0
            } else {
                uid
            });
            ux.slots.extend_from_slice(self.users.slots_of(uid));
            ux.numeric.extend_from_slice(self.users.numeric_of(uid));
            let before = &seq[..p as usize];
            let start = ux.history.len();
            ux.history.extend(before.iter().rev().take(l).map(|e| e.0));
            ux.history.resize(start + l, 0);
            if self.cfg.long_history > 0 {
                push_distinct(
                    &mut ux.long,
                    before.iter().rev().skip(l).map(|e| e.0),
                    self.cfg.long_history,
                    &mut scratch,
                );
            }
            ux.context.extend_from_slice(&context(ts));
            targets.push(item);
            weights.push(w);
        }
        // Each example's seen items, sorted: no random draws, so in parallel (at thousands of
        // examples with long histories this was the bulk of encoding a batch).
        let mask = self.tcfg.mask_seen;
        let seen = batch
            .par_iter()
            .with_min_len(64)
            .map(|&(u, p)| seen_items(mask, &seqs[u as usize][..p as usize]))
            .collect();
        Batch {
            user: UserSide::Rows(ux),
            targets,
            weights,
            seen,
        }
    }

    /// Encodes transformer windows `(u, a)`: user `u`'s items from position `a` (at most L of
    /// them, left-padded), each position a row whose target follows it.
    fn encode_windows(&mut self, batch: &[Example], seqs: &Sequences, user_vid: &[u32]) -> Batch {
        let l = self.cfg.history;
        let drop = self.tcfg.id_dropout;
        let window = self.tcfg.target_window.max(1);
        let mut x = WindowInput::default();
        let (mut rows, mut targets, mut weights, mut seen) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut scratch = HashSet::new();
        for (w, &(u, a)) in batch.iter().enumerate() {
            let seq = &seqs[u as usize];
            let a = a as usize;
            let t_len = l.min(seq.len() - 1 - a);
            let uid = user_vid[u as usize];
            x.users.push(if self.rng.random::<f64>() < drop {
                0
            } else {
                uid
            });
            x.slots.extend_from_slice(self.users.slots_of(uid));
            x.numeric.extend_from_slice(self.users.numeric_of(uid));
            let pad = l - t_len;
            x.seq.extend(std::iter::repeat_n(0, pad));
            x.seq_gaps.extend(std::iter::repeat_n(0, pad));
            x.context
                .extend(std::iter::repeat_n(0.0, pad * CONTEXT_DIM));
            for k in a..a + t_len {
                x.seq.push(seq[k].0);
                x.seq_gaps
                    .push(gap_bucket(k.checked_sub(1).map(|j| seq[k].1 - seq[j].1)));
            }
            if self.cfg.long_history > 0 {
                push_distinct(
                    &mut x.long,
                    seq[..a].iter().rev().map(|e| e.0),
                    self.cfg.long_history,
                    &mut scratch,
                );
            }
            for t in 0..t_len {
                let p = a + t + 1;
                x.context.extend_from_slice(&context(seq[p].1));
                let end = (p + window).min(seq.len());
                let q = self.pick_target(seq, p, end);
                let (item, _, weight) = seq[q];
                let before = &seq[..p];
                if self.tcfg.targets == Targets::New && before.iter().any(|e| e.0 == item) {
                    continue;
                }
                rows.push((w * l + pad + t) as u32);
                targets.push(item);
                weights.push(weight);
                seen.push(seen_items(self.tcfg.mask_seen, before));
            }
        }
        Batch {
            user: UserSide::Windows { x, rows },
            targets,
            weights,
            seen,
        }
    }

    /// A target position in `p..end`: uniformly among the positions whose item the user has not
    /// engaged with before `p` (with `Targets::All`, among all of them).
    fn pick_target(&mut self, seq: &[(u32, i64, f32)], p: usize, end: usize) -> usize {
        let mut cands: Vec<usize> = (p..end).collect();
        if self.tcfg.targets == Targets::New {
            let before: HashSet<u32> = seq[..p].iter().map(|e| e.0).collect();
            cands.retain(|&q| !before.contains(&seq[q].0));
        }
        if cands.is_empty() {
            return p;
        }
        cands[self.rng.random_range(0..cands.len())]
    }

    /// In-batch (and `mixed`: uniformly sampled) candidates with their item inputs and logQ
    /// corrections. Id dropout on positives trains the OOV row as a generic item from features.
    fn sampled_candidates(&mut self, targets: &[u32]) -> (Vec<u32>, ItemInput, Vec<f32>) {
        let b = targets.len();
        let drop = self.tcfg.id_dropout;
        let n_items = self.items.len() as u32;
        let mut cand_ids = targets.to_vec();
        if self.negatives == Negatives::Mixed {
            for _ in 0..self.tcfg.uniform_negatives {
                cand_ids.push(self.rng.random_range(1..n_items.max(2)));
            }
        }
        let mut ix = ItemInput::default();
        for (j, &c) in cand_ids.iter().enumerate() {
            let dropped = j < b && self.rng.random::<f64>() < drop;
            ix.items.push(if dropped { 0 } else { c });
            ix.slots.extend_from_slice(self.items.slots_of(c));
            ix.numeric.extend_from_slice(self.items.numeric_of(c));
        }
        let uniform_n = cand_ids.len() - b;
        let log_q: Vec<f32> = match &mut self.estimator {
            None => vec![0.0; cand_ids.len()],
            Some(est) => {
                if self.streaming {
                    targets.iter().for_each(|&i| est.observe(i));
                }
                let uniform = (uniform_n.max(1) as f64 / (n_items.max(2) - 1) as f64).ln() as f32;
                cand_ids
                    .iter()
                    .enumerate()
                    .map(|(j, &c)| {
                        if j < b {
                            (b as f64 * est.prob(c).max(1e-9)).ln() as f32
                        } else {
                            uniform
                        }
                    })
                    .collect()
            }
        };
        (cand_ids, ix, log_q)
    }
}

impl Trainer {
    pub(crate) fn new(
        cfg: &ModelConfig,
        tcfg: &TrainConfig,
        users: EntityVocab,
        items: EntityVocab,
    ) -> Result<Self> {
        let dev = tcfg.device.open()?;
        if !dev.is_cpu() {
            // Dropout masks are drawn on the device (see `dropout`).
            dev.set_seed(tcfg.seed)?;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(tcfg.seed);
        let emb_std = 0.1;
        let mut user_id = SparseTable::new(users.len(), cfg.id_dim, emb_std, &mut rng);
        let mut user_feat =
            SparseTable::new(users.schema.table_rows, cfg.feature_dim, emb_std, &mut rng);
        let mut item_id = SparseTable::new(items.len(), cfg.id_dim, emb_std, &mut rng);
        let mut item_feat =
            SparseTable::new(items.schema.table_rows, cfg.feature_dim, emb_std, &mut rng);
        // On a GPU the tables move there: gathers and the sparse update run on the device.
        for t in [&mut user_id, &mut user_feat, &mut item_id, &mut item_feat] {
            t.place(&dev)?;
        }
        let user_tower = UserTower::new(cfg, &users.schema, &mut rng, &dev)?;
        let item_tower = ItemTower::new(cfg, &items.schema, &mut rng, &dev)?;
        let log_tau =
            Var::from_tensor(&Tensor::new(tcfg.temperature.max(1e-4).ln() as f32, &dev)?)?;
        let mut vars: Vec<Var> = user_tower
            .named_vars()
            .into_iter()
            .chain(item_tower.named_vars())
            .map(|(_, v)| v)
            .collect();
        if tcfg.learn_temperature {
            vars.push(log_tau.clone());
        }
        let sparse_opt = AdamW {
            lr: tcfg.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: tcfg.weight_decay,
        };
        let dense_opt = DenseAdamW::new(vars, sparse_opt, &dev)?;
        let estimator = estimator(tcfg.logq, items.len(), tcfg.seed);
        let negatives = tcfg.negatives.resolve(items.len());
        let all_items = (negatives == Negatives::Full).then(|| {
            let mut x = ItemInput::default();
            for i in 0..items.len() as u32 {
                x.items.push(i);
                x.slots.extend_from_slice(items.slots_of(i));
                x.numeric.extend_from_slice(items.numeric_of(i));
            }
            x
        });
        let planners = [
            users.len(),
            users.schema.table_rows,
            items.len(),
            items.schema.table_rows,
        ]
        .map(RowPlanner::new);
        let windows = user_tower.seq.is_some();
        let ahead = !dev.is_cpu();
        let (user_schema, item_schema) = (users.schema.clone(), items.schema.clone());
        Ok(Trainer {
            dev,
            profile: None,
            cfg: cfg.clone(),
            tcfg: tcfg.clone(),
            feed: Some(Feeder {
                cfg: cfg.clone(),
                tcfg: tcfg.clone(),
                users,
                items,
                estimator,
                streaming: true,
                negatives,
                windows,
                rng: ChaCha8Rng::seed_from_u64(tcfg.seed.wrapping_add(3)),
                all_items,
                planners,
            }),
            user_schema,
            item_schema,
            user_id,
            user_feat,
            item_id,
            item_feat,
            user_tower,
            item_tower,
            log_tau,
            dense_opt,
            sparse_opt,
            step: 0,
            negatives,
            rng: ChaCha8Rng::seed_from_u64(tcfg.seed.wrapping_add(2)),
            ahead,
        })
    }

    /// Trainable values: every table's rows, the dense layers and the temperature.
    pub(crate) fn parameters(&self) -> usize {
        let tables = [
            &self.user_id,
            &self.user_feat,
            &self.item_id,
            &self.item_feat,
        ]
        .iter()
        .map(|t| t.rows * t.dim)
        .sum::<usize>();
        let dense = self
            .user_tower
            .named_vars()
            .into_iter()
            .chain(self.item_tower.named_vars())
            .map(|(_, v)| v.elem_count())
            .sum::<usize>();
        tables + dense + 1
    }

    /// One optimiser step on `batch`, prepared inline; the batch's loss (a scalar on the
    /// training device, detached from the graph), or `None` when the batch had no targets.
    pub(crate) fn step(
        &mut self,
        batch: &[Example],
        seqs: &Sequences,
        user_vid: &[u32],
    ) -> Result<Option<Tensor>> {
        let laps = Laps::new(self.profile.is_some(), &self.dev);
        let ready = self.feeder_mut().prepare(batch, seqs, user_vid)?;
        self.step_ready(ready, laps)
    }

    /// Steps over `batches` in order, calling `each` with each batch's number and loss. On a
    /// GPU the batches are prepared on a thread of their own, up to [`AHEAD`] ahead, while the
    /// host queues the steps' work; on a CPU, where a step's work already takes every core,
    /// inline.
    pub(crate) fn run_steps<'b>(
        &mut self,
        batches: impl Iterator<Item = &'b [Example]> + Send,
        seqs: &Sequences,
        user_vid: &[u32],
        mut each: impl FnMut(usize, Option<Tensor>) -> Result<()>,
    ) -> Result<()> {
        if !self.ahead {
            for (k, b) in batches.enumerate() {
                let loss = self.step(b, seqs, user_vid)?;
                each(k, loss)?;
            }
            return Ok(());
        }
        let mut feed = self.feed.take().expect("the feeder is home between epochs");
        let (result, feed) = std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Ready>>(AHEAD);
            let producer = s.spawn(move || {
                for b in batches {
                    if tx.send(feed.prepare(b, seqs, user_vid)).is_err() {
                        break;
                    }
                }
                feed
            });
            let mut result = Ok(());
            for k in 0.. {
                // A step's "prepare" part is the wait for its batch.
                let laps = Laps::new(self.profile.is_some(), &self.dev);
                let Ok(ready) = rx.recv() else { break };
                let stepped = ready.and_then(|ready| self.step_ready(ready, laps));
                if let Err(e) = stepped.and_then(|loss| each(k, loss)) {
                    result = Err(e);
                    break;
                }
            }
            // Ends the feeder's loop if a step failed.
            drop(rx);
            (result, producer.join().expect("the batch feeder panicked"))
        });
        self.feed = Some(feed);
        result
    }

    fn feeder_mut(&mut self) -> &mut Feeder {
        self.feed
            .as_mut()
            .expect("the feeder is home between epochs")
    }

    /// One optimiser step on a prepared batch.
    fn step_ready(&mut self, ready: Ready, mut laps: Laps) -> Result<Option<Tensor>> {
        let Ready {
            batch:
                Batch {
                    user,
                    targets,
                    weights,
                    seen,
                },
            ix,
            rows,
            bias,
            encode_ms,
        } = ready;
        if targets.is_empty() {
            return Ok(None);
        }
        let prepare = laps.lap()?;
        let gu = self.user_id.gather(rows.user_id, &self.dev)?;
        let guf = self.user_feat.gather(rows.user_feat, &self.dev)?;
        let gi = self.item_id.gather(rows.item_id, &self.dev)?;
        let gif = self.item_feat.gather(rows.item_feat, &self.dev)?;
        let gather = laps.lap()?;
        let tables = UserTables {
            user_id: Table::Gathered(&gu),
            user_feat: Table::Gathered(&guf),
            history: Table::Gathered(&gi),
        };
        let p = self.tcfg.dropout;
        let rng = &mut self.rng;
        let mut reg = |x: &Tensor| dropout(x, p, rng);
        let user_in = match &user {
            UserSide::Rows(ux) => {
                self.user_tower
                    .input(&tables, &self.user_schema, ux, &mut reg)?
            }
            UserSide::Windows { x, rows } => self
                .user_tower
                .input_windows(&tables, &self.user_schema, x, &mut reg)?
                .index_select(&Tensor::from_slice(rows, rows.len(), &self.dev)?, 0)?,
        };
        let user_in = dropout(&user_in, p, &mut self.rng)?;
        let u = self.user_tower.head(&user_in)?;
        let user_ms = laps.lap()?;
        let item_tables = ItemTables {
            item_id: Table::Gathered(&gi),
            item_feat: Table::Gathered(&gif),
        };
        let item_in = self
            .item_tower
            .input(&item_tables, &self.item_schema, &ix)?;
        let item_in = dropout(&item_in, p, &mut self.rng)?;
        let c = l2_normalize(&self.item_tower.mlp.forward(&item_in)?)?;
        let item_ms = laps.lap()?;
        let inv_tau = self.log_tau.as_tensor().neg()?.exp()?;
        let loss = match bias {
            Some(bias) => sampled_softmax_loss_biased(&u, &c, &inv_tau, bias, Some(&weights))?,
            None => {
                let seen = self.tcfg.mask_seen.then_some(&seen[..]);
                full_softmax_loss(&u, &c, &inv_tau, &targets, Some(&weights), seen)?
            }
        };
        let loss_ms = laps.lap()?;
        let grads = loss.backward()?;
        let backward = laps.lap()?;
        self.dense_opt.step(&grads, self.step + 1)?;
        self.step += 1;
        for (table, g) in [
            (&mut self.user_id, gu),
            (&mut self.user_feat, guf),
            (&mut self.item_id, gi),
            (&mut self.item_feat, gif),
        ] {
            if let Some(grad) = grads.get(&g.leaf) {
                table.apply(&g, grad, &self.sparse_opt, self.step)?;
            }
        }
        let update = laps.lap()?;
        if let Some(p) = &mut self.profile {
            p.prepare_ms += prepare;
            p.encode_ms += encode_ms;
            p.gather_ms += gather;
            p.forward_ms += user_ms + item_ms + loss_ms;
            p.user_ms += user_ms;
            p.item_ms += item_ms;
            p.loss_ms += loss_ms;
            p.backward_ms += backward;
            p.update_ms += update;
            p.steps += 1;
        }
        Ok(Some(loss.detach()))
    }

    /// A deep copy of the current weights as an inference model.
    fn snapshot(&self) -> Result<TwoTower> {
        let user_tower = Tensors::copies(self.user_tower.named_vars())?.user_tower(&self.cfg)?;
        let copy_mlp = |m: &Mlp| -> Result<Mlp> {
            Ok(Mlp {
                layers: m
                    .layers
                    .iter()
                    .map(|l| {
                        Ok(Linear {
                            weight: Var::from_tensor(&host_copy(l.weight.as_tensor())?)?,
                            bias: Var::from_tensor(&host_copy(l.bias.as_tensor())?)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
            })
        };
        let item_tower = ItemTower {
            cfg: self.cfg.clone(),
            mlp: copy_mlp(&self.item_tower.mlp)?,
        };
        let item_ids = self.item_id.to_tensor(&Device::Cpu)?;
        let temperature = self.log_tau.as_tensor().exp()?.to_scalar::<f32>()?;
        let feed = self
            .feed
            .as_ref()
            .expect("the feeder is home between epochs");
        let user = UserModel::new(
            self.cfg.clone(),
            feed.users.clone(),
            feed.items.ids.clone(),
            user_tower,
            [
                self.user_id.to_tensor(&Device::Cpu)?,
                self.user_feat.to_tensor(&Device::Cpu)?,
                item_ids.clone(),
            ],
            temperature,
        );
        let item = ItemModel {
            cfg: self.cfg.clone(),
            items: feed.items.clone(),
            tower: item_tower,
            id_emb: item_ids,
            feat_emb: self.item_feat.to_tensor(&Device::Cpu)?,
        };
        Ok(TwoTower { user, item })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batches prepared ahead on their own thread are the batches prepared inline: the same
    /// seed trains the same weights either way.
    #[test]
    fn batches_prepared_ahead_train_the_same_weights_as_inline() {
        let (users, items, len) = (40u32, 300u32, 30usize);
        let cfg = ModelConfig {
            dim: 8,
            id_dim: 8,
            hidden: 16,
            history: 6,
            ..Default::default()
        };
        let tcfg = TrainConfig {
            batch_size: 32,
            ..Default::default()
        };
        let names =
            |p: &str, n: u32| -> Vec<String> { (0..n).map(|i| format!("{p}{i}")).collect() };
        let (u_ids, i_ids) = (names("u", users), names("i", items));
        let vocab = |ids: &[String]| EntityVocab::build(ids.iter().map(String::as_str), None, 4);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let seqs: Sequences = (0..users)
            .map(|_| {
                (0..len)
                    .map(|t| (rng.random_range(1..=items), t as i64, 1.0))
                    .collect()
            })
            .collect();
        let user_vid: Vec<u32> = (1..=users).collect();
        let batches: Vec<Vec<Example>> = (0..6)
            .map(|_| {
                (0..32)
                    .map(|_| (rng.random_range(0..users), rng.random_range(6..len as u32)))
                    .collect()
            })
            .collect();
        let weights = |t: &Trainer| -> Vec<f32> {
            let w = t.item_id.to_tensor(&Device::Cpu).unwrap();
            w.flatten_all().unwrap().to_vec1().unwrap()
        };
        let train = |ahead: bool| -> Vec<f32> {
            let mut t = Trainer::new(&cfg, &tcfg, vocab(&u_ids), vocab(&i_ids)).unwrap();
            t.ahead = ahead;
            let mut losses = 0;
            t.run_steps(
                batches.iter().map(Vec::as_slice),
                &seqs,
                &user_vid,
                |_, l| {
                    losses += l.is_some() as usize;
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(losses, batches.len(), "every batch stepped");
            assert!(t.feed.is_some(), "the feeder came home");
            weights(&t)
        };
        let (inline, ahead) = (train(false), train(true));
        assert_eq!(inline, ahead);
        let fresh = weights(&Trainer::new(&cfg, &tcfg, vocab(&u_ids), vocab(&i_ids)).unwrap());
        assert_ne!(inline, fresh, "training moved the weights");
    }
}
