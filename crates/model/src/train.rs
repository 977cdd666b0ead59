//! Training: in-batch sampled softmax with logQ correction over causal examples.
//!
//! Every train event `(u, i, t)` is one example: the user tower sees `u`'s features, the L items
//! `u` engaged with before it (most recent first) and the time context of `t`; the item tower sees
//! `i`. The other positives of the batch (plus optional uniform corpus samples) are the
//! negatives. With validation enabled, the events given are split by the protocol; the model
//! trains only on the train side and early-stops on the validation side's recall.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tandem_data::{EventLog, FeatureTable, Protocol, Split};

use crate::config::{LogQ, ModelConfig, TrainConfig};
use crate::encode::EntityVocab;
use crate::eval::{metrics, EvalSet, ModelRanker, Recommender};
use crate::logq::{estimator, ExactCounts, FrequencyEstimator};
use crate::loss::sampled_softmax_loss;
use crate::model::{ItemModel, TwoTower, UserModel};
use crate::params::{AdamW, SparseTable, Table};
use crate::towers::{
    context, ItemInput, ItemTables, ItemTower, Linear, Mlp, UserInput, UserTables, UserTower,
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
    pub best_epoch: usize,
    pub validation: BTreeMap<String, f64>,
    pub epochs: Vec<EpochReport>,
    pub seconds: f64,
}

/// One example: (log user index, position in that user's train sequence).
type Example = (u32, u32);

struct Trainer {
    dev: Device,
    cfg: ModelConfig,
    tcfg: TrainConfig,
    users: EntityVocab,
    items: EntityVocab,
    user_id: SparseTable,
    user_feat: SparseTable,
    item_id: SparseTable,
    item_feat: SparseTable,
    user_tower: UserTower,
    item_tower: ItemTower,
    log_tau: Var,
    dense_opt: candle_nn::AdamW,
    sparse_opt: AdamW,
    step: u64,
    estimator: Option<Box<dyn FrequencyEstimator>>,
    streaming: bool,
    rng: ChaCha8Rng,
}

/// Per log user: (item id of this version, timestamp, weight) of each train event, time order.
type Sequences = Vec<Vec<(u32, i64, f32)>>;

pub fn train(
    input: &TrainInput,
    cfg: &ModelConfig,
    tcfg: &TrainConfig,
    progress: bool,
) -> Result<(TwoTower, TrainReport)> {
    let started = Instant::now();
    let log = input.log;
    if log.is_empty() {
        return Err(ModelError::Invalid("no events to train on".into()));
    }
    let split = match input.validation {
        Some(p) => Split::new(log, p),
        None => Split {
            train: log.time_order(),
            test: Vec::new(),
        },
    };
    let validation = input
        .validation
        .map(|_| EvalSet::new(log, &split).sample(tcfg.max_validation_users, tcfg.seed));
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
    let mut seqs: Sequences = vec![Vec::new(); log.users.len()];
    for &e in &split.train {
        let e = e as usize;
        seqs[log.user[e] as usize].push((item_vid[log.item[e] as usize], log.ts[e], log.weight[e]));
    }
    let mut examples: Vec<Example> = seqs
        .iter()
        .enumerate()
        .flat_map(|(u, s)| (0..s.len() as u32).map(move |p| (u as u32, p)))
        .collect();
    if examples.is_empty() {
        return Err(ModelError::Invalid(
            "no training events left after carving the validation slice".into(),
        ));
    }

    let mut t = Trainer::new(cfg, tcfg, users, items)?;
    if tcfg.logq == LogQ::Exact {
        // Exact counts are known before training: count the whole train stream once.
        let mut exact = ExactCounts::new(t.items.len());
        examples
            .iter()
            .for_each(|&(u, p)| exact.observe(seqs[u as usize][p as usize].0));
        t.estimator = Some(Box::new(exact));
        t.streaming = false;
    }

    let mut report = TrainReport {
        examples: examples.len(),
        validation_users: validation.as_ref().map_or(0, |v| v.users.len()),
        best_epoch: 0,
        validation: BTreeMap::new(),
        epochs: Vec::new(),
        seconds: 0.0,
    };
    let mut best: Option<(f64, TwoTower)> = None;
    let mut shuffle_rng = ChaCha8Rng::seed_from_u64(tcfg.seed.wrapping_add(1));
    let batches = examples.len().div_ceil(tcfg.batch_size);
    for epoch in 1..=tcfg.epochs.max(1) {
        for i in (1..examples.len()).rev() {
            examples.swap(i, shuffle_rng.random_range(0..=i));
        }
        let bar = if progress {
            ProgressBar::new(batches as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix:>3} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(epoch.to_string());
        let epoch_start = Instant::now();
        let mut loss_sum = 0.0;
        for (k, batch) in examples.chunks(tcfg.batch_size).enumerate() {
            let loss = t.step(batch, &seqs, &user_vid)?;
            if !loss.is_finite() {
                return Err(ModelError::Invalid(format!(
                    "loss became {loss} at epoch {epoch}, batch {k}: lower --lr"
                )));
            }
            loss_sum += loss;
            let done = ((k + 1) * tcfg.batch_size).min(examples.len());
            bar.set_message(format!(
                "loss {:.4} · {:.0} ex/s",
                loss_sum / (k + 1) as f64,
                done as f64 / epoch_start.elapsed().as_secs_f64().max(1e-9)
            ));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let seconds = epoch_start.elapsed().as_secs_f64();
        let snapshot = t.snapshot()?;
        let mut epoch_report = EpochReport {
            epoch,
            loss: loss_sum / batches as f64,
            examples_per_sec: examples.len() as f64 / seconds.max(1e-9),
            seconds,
            validation: BTreeMap::new(),
        };
        let score = match &validation {
            Some(set) => {
                let ranker = ModelRanker {
                    model: &snapshot,
                    log,
                    items: None,
                };
                let m = metrics(set, &ranker.recommend(set, 100)?);
                epoch_report.validation = m.values;
                *epoch_report
                    .validation
                    .get(&tcfg.early_stopping_metric)
                    .ok_or_else(|| {
                        ModelError::Invalid(format!(
                            "unknown early-stopping metric {:?}",
                            tcfg.early_stopping_metric
                        ))
                    })?
            }
            // Without validation the last epoch is kept.
            None => epoch as f64,
        };
        tracing::info!(epoch, loss = epoch_report.loss, ex_per_s = epoch_report.examples_per_sec, ?epoch_report.validation, "epoch done");
        if progress {
            let val = epoch_report
                .validation
                .get(&tcfg.early_stopping_metric)
                .map(|v| format!(" · val {} {v:.4}", tcfg.early_stopping_metric))
                .unwrap_or_default();
            eprintln!(
                "epoch {epoch}: loss {:.4} · {:.0} ex/s{val}",
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
    report.seconds = started.elapsed().as_secs_f64();
    Ok((model, report))
}

impl Trainer {
    fn new(
        cfg: &ModelConfig,
        tcfg: &TrainConfig,
        users: EntityVocab,
        items: EntityVocab,
    ) -> Result<Self> {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(tcfg.seed);
        let emb_std = 0.1;
        let user_id = SparseTable::new(users.len(), cfg.id_dim, emb_std, &mut rng);
        let user_feat =
            SparseTable::new(users.schema.table_rows, cfg.feature_dim, emb_std, &mut rng);
        let item_id = SparseTable::new(items.len(), cfg.id_dim, emb_std, &mut rng);
        let item_feat =
            SparseTable::new(items.schema.table_rows, cfg.feature_dim, emb_std, &mut rng);
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
        let dense_opt = candle_nn::AdamW::new(
            vars,
            candle_nn::ParamsAdamW {
                lr: tcfg.lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: tcfg.weight_decay,
            },
        )?;
        let estimator = estimator(tcfg.logq, items.len(), tcfg.seed);
        Ok(Trainer {
            dev,
            cfg: cfg.clone(),
            tcfg: tcfg.clone(),
            users,
            items,
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
            estimator,
            streaming: true,
            rng: ChaCha8Rng::seed_from_u64(tcfg.seed.wrapping_add(2)),
        })
    }

    fn step(&mut self, batch: &[Example], seqs: &Sequences, user_vid: &[u32]) -> Result<f64> {
        let b = batch.len();
        let l = self.cfg.history;
        let drop = self.tcfg.id_dropout;
        let mut ux = UserInput::default();
        let mut targets = Vec::with_capacity(b);
        let mut weights = Vec::with_capacity(b);
        for &(u, p) in batch {
            let seq = &seqs[u as usize];
            let (item, ts, w) = seq[p as usize];
            let uid = user_vid[u as usize];
            ux.users.push(if self.rng.random::<f64>() < drop {
                0
            } else {
                uid
            });
            ux.slots.extend_from_slice(self.users.slots_of(uid));
            ux.numeric.extend_from_slice(self.users.numeric_of(uid));
            let start = ux.history.len();
            ux.history
                .extend(seq[..p as usize].iter().rev().take(l).map(|e| e.0));
            ux.history.resize(start + l, 0);
            ux.context.extend_from_slice(&context(ts));
            targets.push(item);
            weights.push(w);
        }
        let n_items = self.items.len() as u32;
        let mut cand_ids = targets.clone();
        for _ in 0..self.tcfg.uniform_negatives {
            cand_ids.push(self.rng.random_range(1..n_items.max(2)));
        }
        let mut ix = ItemInput::default();
        for (j, &c) in cand_ids.iter().enumerate() {
            // Id dropout on positives only: the OOV row learns a generic item from features.
            let dropped = j < b && self.rng.random::<f64>() < drop;
            ix.items.push(if dropped { 0 } else { c });
            ix.slots.extend_from_slice(self.items.slots_of(c));
            ix.numeric.extend_from_slice(self.items.numeric_of(c));
        }
        let log_q: Vec<f32> = match &mut self.estimator {
            None => vec![0.0; cand_ids.len()],
            Some(est) => {
                if self.streaming {
                    targets.iter().for_each(|&i| est.observe(i));
                }
                let uniform =
                    (self.tcfg.uniform_negatives as f64 / (n_items.max(2) - 1) as f64).ln() as f32;
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
        let pad = [0u32];
        let gu = self
            .user_id
            .gather(ux.users.iter().chain(&pad), &self.dev)?;
        let guf = self
            .user_feat
            .gather(ux.slots.iter().chain(&pad), &self.dev)?;
        let gi = self
            .item_id
            .gather(ux.history.iter().chain(&ix.items).chain(&pad), &self.dev)?;
        let gif = self
            .item_feat
            .gather(ix.slots.iter().chain(&pad), &self.dev)?;
        let u = self.user_tower.forward(
            &UserTables {
                user_id: Table::Gathered(&gu),
                user_feat: Table::Gathered(&guf),
                history: Table::Gathered(&gi),
            },
            &self.users.schema,
            &ux,
        )?;
        let c = self.item_tower.forward(
            &ItemTables {
                item_id: Table::Gathered(&gi),
                item_feat: Table::Gathered(&gif),
            },
            &self.items.schema,
            &ix,
        )?;
        let inv_tau = self.log_tau.as_tensor().neg()?.exp()?;
        let loss = sampled_softmax_loss(
            &u,
            &c,
            &inv_tau,
            &log_q,
            &targets,
            &cand_ids,
            Some(&weights),
        )?;
        let value = loss.to_scalar::<f32>()? as f64;
        let grads = loss.backward()?;
        self.dense_opt.step(&grads)?;
        self.step += 1;
        for (table, g) in [
            (&mut self.user_id, &gu),
            (&mut self.user_feat, &guf),
            (&mut self.item_id, &gi),
            (&mut self.item_feat, &gif),
        ] {
            if let Some(grad) = grads.get(&g.leaf) {
                table.apply(g, grad, &self.sparse_opt, self.step)?;
            }
        }
        Ok(value)
    }

    /// A deep copy of the current weights as an inference model.
    fn snapshot(&self) -> Result<TwoTower> {
        let copy_mlp = |m: &Mlp| -> Result<Mlp> {
            Ok(Mlp {
                layers: m
                    .layers
                    .iter()
                    .map(|l| {
                        Ok(Linear {
                            weight: Var::from_tensor(&l.weight.as_tensor().copy()?)?,
                            bias: Var::from_tensor(&l.bias.as_tensor().copy()?)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
            })
        };
        let user_tower = UserTower {
            cfg: self.cfg.clone(),
            mlp: copy_mlp(&self.user_tower.mlp)?,
            attn_query: self
                .user_tower
                .attn_query
                .as_ref()
                .map(|q| q.as_tensor().copy().and_then(|t| Var::from_tensor(&t)))
                .transpose()?,
        };
        let item_tower = ItemTower {
            cfg: self.cfg.clone(),
            mlp: copy_mlp(&self.item_tower.mlp)?,
        };
        let item_ids = self.item_id.to_tensor(&self.dev)?;
        let temperature = self.log_tau.as_tensor().exp()?.to_scalar::<f32>()?;
        let user = UserModel::new(
            self.cfg.clone(),
            self.users.clone(),
            self.items.ids.clone(),
            user_tower,
            [
                self.user_id.to_tensor(&self.dev)?,
                self.user_feat.to_tensor(&self.dev)?,
                item_ids.clone(),
            ],
            temperature,
        );
        let item = ItemModel {
            cfg: self.cfg.clone(),
            items: self.items.clone(),
            tower: item_tower,
            id_emb: item_ids,
            feat_emb: self.item_feat.to_tensor(&self.dev)?,
        };
        Ok(TwoTower { user, item })
    }
}

/// The fixed synthetic shape of `tandem bench train`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchShape {
    pub users: usize,
    pub items: usize,
    pub history: usize,
    pub batch_size: usize,
    pub dim: usize,
    pub hidden: usize,
}

impl Default for BenchShape {
    fn default() -> Self {
        BenchShape {
            users: 20_000,
            items: 100_000,
            history: 50,
            batch_size: 1024,
            dim: 64,
            hidden: 256,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub steps: usize,
    pub examples_per_sec: f64,
    pub ms_per_step: f64,
}

/// Times `steps` training steps (after 3 warm-up steps) on random full-length histories.
pub fn bench_train(shape: &BenchShape, steps: usize) -> Result<BenchResult> {
    let cfg = ModelConfig {
        dim: shape.dim,
        id_dim: shape.dim,
        hidden: shape.hidden,
        history: shape.history,
        ..Default::default()
    };
    let tcfg = TrainConfig {
        batch_size: shape.batch_size,
        ..Default::default()
    };
    let user_ids: Vec<String> = (0..shape.users).map(|u| format!("u{u}")).collect();
    let item_ids: Vec<String> = (0..shape.items).map(|i| format!("i{i}")).collect();
    let users = EntityVocab::build(user_ids.iter().map(String::as_str), None, cfg.max_multi);
    let items = EntityVocab::build(item_ids.iter().map(String::as_str), None, cfg.max_multi);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let seq_len = shape.history + 10;
    let seqs: Sequences = (0..shape.users)
        .map(|_| {
            (0..seq_len)
                .map(|t| (rng.random_range(1..shape.items as u32 + 1), t as i64, 1.0))
                .collect()
        })
        .collect();
    let user_vid: Vec<u32> = (1..=shape.users as u32).collect();
    let mut t = Trainer::new(&cfg, &tcfg, users, items)?;
    let mut batch = || -> Vec<Example> {
        (0..shape.batch_size)
            .map(|_| {
                (
                    rng.random_range(0..shape.users as u32),
                    rng.random_range(shape.history as u32..seq_len as u32),
                )
            })
            .collect()
    };
    let batches: Vec<Vec<Example>> = (0..steps + 3).map(|_| batch()).collect();
    for b in &batches[..3] {
        t.step(b, &seqs, &user_vid)?;
    }
    let started = Instant::now();
    for b in &batches[3..] {
        t.step(b, &seqs, &user_vid)?;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(BenchResult {
        steps,
        examples_per_sec: (steps * shape.batch_size) as f64 / secs,
        ms_per_step: secs * 1000.0 / steps.max(1) as f64,
    })
}
