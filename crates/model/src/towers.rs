//! The two towers.
//!
//! User tower: `[user-id emb | user feature embs | user numerics | pooled history | last item |
//! time context] → MLP → L2-normalise`. Item tower: `[item-id emb | item feature embs | item
//! numerics] → MLP → L2-normalise`. History items are embedded with the item-id table, so what
//! the model learns about an item as a target also describes users who engaged with it.
//!
//! The towers hold only their dense layers; embedding tables are passed in as [`Table`]s so the
//! same forward code runs on gathered rows while training and on full tables when serving.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand_chacha::ChaCha8Rng;

use crate::config::{ModelConfig, UserEncoder};
use crate::encode::FeatureSchema;
use crate::params::{normal_vec, Table};
use crate::sequence::{Regularize, SeqEncoder};

/// Width of the time-context vector (hour-of-day and day-of-week as sin/cos).
pub const CONTEXT_DIM: usize = 4;

/// Time context of a request at unix time `ts`.
pub fn context(ts: i64) -> [f32; CONTEXT_DIM] {
    use std::f32::consts::TAU;
    let hour = ts.rem_euclid(86_400) as f32 / 3_600.0;
    // 1970-01-01 was a Thursday: shift so Monday = 0.
    let dow = (ts.div_euclid(86_400) + 3).rem_euclid(7) as f32;
    [
        (TAU * hour / 24.0).sin(),
        (TAU * hour / 24.0).cos(),
        (TAU * dow / 7.0).sin(),
        (TAU * dow / 7.0).cos(),
    ]
}

pub struct Linear {
    pub weight: Var,
    pub bias: Var,
}

impl Linear {
    pub fn new(
        inp: usize,
        out: usize,
        std: f32,
        rng: &mut ChaCha8Rng,
        dev: &Device,
    ) -> Result<Self> {
        Ok(Linear {
            weight: Var::from_tensor(&Tensor::from_vec(
                normal_vec(rng, inp * out, std),
                (out, inp),
                dev,
            )?)?,
            bias: Var::from_tensor(&Tensor::zeros(out, DType::F32, dev)?)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// Linear layers with ReLU between them (none after the last).
pub struct Mlp {
    pub layers: Vec<Linear>,
}

impl Mlp {
    pub fn new(dims: &[usize], rng: &mut ChaCha8Rng, dev: &Device) -> Result<Self> {
        let mut layers = Vec::new();
        for (k, w) in dims.windows(2).enumerate() {
            let last = k + 2 == dims.len();
            // He initialisation for ReLU layers, unit-variance for the output projection.
            let gain = if last { 1.0 } else { 2.0 };
            let std = (gain / w[0] as f32).sqrt();
            layers.push(Linear::new(w[0], w[1], std, rng, dev)?);
        }
        Ok(Mlp { layers })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (k, l) in self.layers.iter().enumerate() {
            x = l.forward(&x)?;
            if k + 1 < self.layers.len() {
                x = x.relu()?;
            }
        }
        Ok(x)
    }

    pub fn named_vars(&self, prefix: &str) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(k, l)| {
                [
                    (format!("{prefix}.{k}.weight"), l.weight.clone()),
                    (format!("{prefix}.{k}.bias"), l.bias.clone()),
                ]
            })
            .collect()
    }
}

pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    x.broadcast_div(&norm)
}

/// Pools every categorical field of `schema` from `slots` (b × slot_width) into one
/// `(b, feature_dim)` tensor per field.
fn pool_fields(
    table: &Table,
    schema: &FeatureSchema,
    slots: &[u32],
    b: usize,
) -> Result<Vec<Tensor>> {
    let w = schema.slot_width;
    let mut out = Vec::new();
    for (start, f) in schema.cat_fields() {
        let ids: Vec<u32> = (0..b)
            .flat_map(|r| {
                slots[r * w + start..r * w + start + f.width]
                    .iter()
                    .copied()
            })
            .collect();
        let pooled = if f.width == 1 {
            table.lookup(&ids)?
        } else {
            table.mean_pool(&ids, b, f.width)?
        };
        out.push(pooled);
    }
    Ok(out)
}

/// A batch of user-tower inputs (row-major, `b` rows).
#[derive(Debug, Clone, Default)]
pub struct UserInput {
    pub users: Vec<u32>,
    pub slots: Vec<u32>,
    pub numeric: Vec<f32>,
    /// `b × L` item ids, most recent first, 0 = padding.
    pub history: Vec<u32>,
    /// `b × H` (H = `long_history`) distinct item ids from the history older than the recent
    /// L, most recent first, 0 = padding; empty when the model has no long-history summary.
    pub long: Vec<u32>,
    /// Transformer encoder only: `b × L` the recent items oldest first, left-padded with 0, and
    /// the gap bucket of each.
    pub seq: Vec<u32>,
    pub seq_gaps: Vec<u32>,
    pub context: Vec<f32>,
}

impl UserInput {
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// A batch of item-tower inputs.
#[derive(Debug, Clone, Default)]
pub struct ItemInput {
    pub items: Vec<u32>,
    pub slots: Vec<u32>,
    pub numeric: Vec<f32>,
}

/// Embedding tables the user tower reads.
pub struct UserTables<'a> {
    pub user_id: Table<'a>,
    pub user_feat: Table<'a>,
    /// The item-id table, for history items.
    pub history: Table<'a>,
}

pub struct UserTower {
    pub cfg: ModelConfig,
    pub mlp: Mlp,
    /// The learned attention query (attention encoder only).
    pub attn_query: Option<Var>,
    /// The causal self-attention encoder (transformer encoder only).
    pub seq: Option<SeqEncoder>,
}

pub fn user_input_dim(cfg: &ModelConfig, schema: &FeatureSchema) -> usize {
    let id = if cfg.use_user_id { cfg.id_dim } else { 0 };
    let cats = schema.cat_fields().count() * cfg.feature_dim;
    let long = if cfg.long_history > 0 { cfg.id_dim } else { 0 };
    let recent = match cfg.user_encoder {
        UserEncoder::Transformer => cfg.id_dim,
        UserEncoder::Mean | UserEncoder::Attention => 2 * cfg.id_dim,
    };
    id + cats + schema.numeric + recent + long + CONTEXT_DIM
}

pub fn item_input_dim(cfg: &ModelConfig, schema: &FeatureSchema) -> usize {
    cfg.id_dim + schema.cat_fields().count() * cfg.feature_dim + schema.numeric
}

/// One-pass training input of the transformer encoder: `b` windows of `L` positions, each
/// position a row of its own (it predicts what follows it).
#[derive(Debug, Clone, Default)]
pub struct WindowInput {
    pub users: Vec<u32>,
    pub slots: Vec<u32>,
    pub numeric: Vec<f32>,
    /// `b × L` item ids, oldest first, left-padded with 0.
    pub seq: Vec<u32>,
    pub seq_gaps: Vec<u32>,
    /// `b × H` distinct items older than the window (the long-history summary).
    pub long: Vec<u32>,
    /// `b × L × CONTEXT_DIM`: each row's time context.
    pub context: Vec<f32>,
}

fn device_of(t: &Table) -> Device {
    match t {
        Table::Full(t) => t.device().clone(),
        Table::Gathered(g) => g.leaf.device().clone(),
    }
}

impl UserTower {
    pub fn new(
        cfg: &ModelConfig,
        schema: &FeatureSchema,
        rng: &mut ChaCha8Rng,
        dev: &Device,
    ) -> Result<Self> {
        let inp = user_input_dim(cfg, schema);
        let attn_query = match cfg.user_encoder {
            UserEncoder::Attention => Some(Var::from_tensor(&Tensor::from_vec(
                normal_vec(rng, cfg.id_dim, (1.0 / cfg.id_dim as f32).sqrt()),
                (cfg.id_dim, 1),
                dev,
            )?)?),
            _ => None,
        };
        let seq = match cfg.user_encoder {
            UserEncoder::Transformer => Some(SeqEncoder::new(
                cfg.id_dim,
                cfg.seq_heads,
                cfg.seq_layers,
                cfg.history,
                rng,
                dev,
            )?),
            _ => None,
        };
        Ok(UserTower {
            cfg: cfg.clone(),
            mlp: Mlp::new(&[inp, cfg.hidden, cfg.dim], rng, dev)?,
            attn_query,
            seq,
        })
    }

    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut v = self.mlp.named_vars("user.mlp");
        if let Some(q) = &self.attn_query {
            v.push(("user.attn_query".into(), q.clone()));
        }
        if let Some(s) = &self.seq {
            v.extend(s.named_vars("user.seq"));
        }
        v
    }

    pub fn forward(&self, t: &UserTables, schema: &FeatureSchema, x: &UserInput) -> Result<Tensor> {
        self.head(&self.input(t, schema, x, &mut |x| Ok(x.clone()))?)
    }

    /// The MLP and the normalisation, on an input from [`UserTower::input`].
    pub fn head(&self, input: &Tensor) -> Result<Tensor> {
        l2_normalize(&self.mlp.forward(input)?)
    }

    /// The per-user parts: id embedding, categorical and numeric features.
    fn profile(
        &self,
        t: &UserTables,
        schema: &FeatureSchema,
        users: &[u32],
        slots: &[u32],
        numeric: &[f32],
    ) -> Result<Vec<Tensor>> {
        let b = users.len();
        let mut parts = Vec::new();
        if self.cfg.use_user_id {
            parts.push(t.user_id.lookup(users)?);
        }
        parts.extend(pool_fields(&t.user_feat, schema, slots, b)?);
        if schema.numeric > 0 {
            parts.push(Tensor::from_slice(
                numeric,
                (b, schema.numeric),
                &device_of(&t.history),
            )?);
        }
        Ok(parts)
    }

    /// The transformer over `b` windows of `L`: `(b, L, id_dim)`, zero where a window holds no
    /// item at all.
    fn encode_windows(
        &self,
        t: &UserTables,
        seq: &[u32],
        gaps: &[u32],
        b: usize,
        reg: Regularize,
    ) -> Result<Tensor> {
        let enc = self
            .seq
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("no sequence encoder".into()))?;
        let l = self.cfg.history;
        let emb = t.history.lookup(seq)?;
        let out = enc.forward(&emb, seq, gaps, b, l, reg)?;
        let any: Vec<f32> = seq
            .chunks(l)
            .map(|c| c.iter().any(|&i| i != 0) as u8 as f32)
            .collect();
        out.broadcast_mul(&Tensor::from_vec(any, (b, 1, 1), emb.device())?)
    }

    /// The MLP's input: every part of the user representation, concatenated. `reg` regularises
    /// inside the sequence encoder while training.
    pub fn input(
        &self,
        t: &UserTables,
        schema: &FeatureSchema,
        x: &UserInput,
        reg: Regularize,
    ) -> Result<Tensor> {
        let b = x.len();
        let l = self.cfg.history;
        let dev = device_of(&t.history);
        let mut parts = self.profile(t, schema, &x.users, &x.slots, &x.numeric)?;
        if self.seq.is_some() {
            // The window's latest position is the user's state now.
            let out = self.encode_windows(t, &x.seq, &x.seq_gaps, b, reg)?;
            parts.push(out.narrow(1, l - 1, 1)?.squeeze(1)?);
        } else {
            parts.push(self.pooled(t, x, b, &dev)?);
            // The most recent item on its own: recency matters more than the bag average.
            let last: Vec<u32> = x.history.chunks(l).map(|c| c[0]).collect();
            parts.push(t.history.mean_pool(&last, b, 1)?);
        }
        let h = self.cfg.long_history;
        if h > 0 {
            parts.push(t.history.mean_pool(&x.long, b, h)?);
        }
        parts.push(Tensor::from_slice(&x.context, (b, CONTEXT_DIM), &dev)?);
        Tensor::cat(&parts, 1)
    }

    /// The MLP inputs of every position of `x.users.len()` windows (the transformer's one-pass
    /// training form): `(b·L, in)`, in the same part order as [`UserTower::input`].
    pub fn input_windows(
        &self,
        t: &UserTables,
        schema: &FeatureSchema,
        x: &WindowInput,
        reg: Regularize,
    ) -> Result<Tensor> {
        let b = x.users.len();
        let l = self.cfg.history;
        let dev = device_of(&t.history);
        let per_row = |p: Tensor| -> Result<Tensor> {
            let k = p.dim(1)?;
            p.unsqueeze(1)?.broadcast_as((b, l, k))?.reshape((b * l, k))
        };
        let mut parts = self
            .profile(t, schema, &x.users, &x.slots, &x.numeric)?
            .into_iter()
            .map(per_row)
            .collect::<Result<Vec<_>>>()?;
        let out = self.encode_windows(t, &x.seq, &x.seq_gaps, b, reg)?;
        parts.push(out.reshape((b * l, self.cfg.id_dim))?);
        let h = self.cfg.long_history;
        if h > 0 {
            parts.push(per_row(t.history.mean_pool(&x.long, b, h)?)?);
        }
        parts.push(Tensor::from_slice(&x.context, (b * l, CONTEXT_DIM), &dev)?);
        Tensor::cat(&parts, 1)
    }

    /// Mean or attention pooling of the recent sequence.
    fn pooled(&self, t: &UserTables, x: &UserInput, b: usize, dev: &Device) -> Result<Tensor> {
        let l = self.cfg.history;
        let Some(q) = &self.attn_query else {
            return t.history.mean_pool(&x.history, b, l);
        };
        let hist = t
            .history
            .lookup(&x.history)?
            .reshape((b, l, self.cfg.id_dim))?;
        // Padding gets -1e9 before the softmax; users with no history at all end up with
        // uniform weights over padding, so their pooled vector is zeroed explicitly.
        let bias: Vec<f32> = x
            .history
            .iter()
            .map(|&i| if i == 0 { -1e9 } else { 0.0 })
            .collect();
        let any: Vec<f32> = x
            .history
            .chunks(l)
            .map(|c| c.iter().any(|&i| i != 0) as u8 as f32)
            .collect();
        let scale = 1.0 / (self.cfg.id_dim as f64).sqrt();
        let scores = (hist.broadcast_matmul(q.as_tensor())? * scale)?
            .broadcast_add(&Tensor::from_vec(bias, (b, l, 1), dev)?)?;
        let w = candle_nn::ops::softmax(&scores, 1)?;
        hist.broadcast_mul(&w)?
            .sum(1)?
            .broadcast_mul(&Tensor::from_vec(any, (b, 1), dev)?)
    }
}

/// Embedding tables the item tower reads.
pub struct ItemTables<'a> {
    pub item_id: Table<'a>,
    pub item_feat: Table<'a>,
}

pub struct ItemTower {
    pub cfg: ModelConfig,
    pub mlp: Mlp,
}

impl ItemTower {
    pub fn new(
        cfg: &ModelConfig,
        schema: &FeatureSchema,
        rng: &mut ChaCha8Rng,
        dev: &Device,
    ) -> Result<Self> {
        let inp = item_input_dim(cfg, schema);
        Ok(ItemTower {
            cfg: cfg.clone(),
            mlp: Mlp::new(&[inp, cfg.hidden, cfg.dim], rng, dev)?,
        })
    }

    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.mlp.named_vars("item.mlp")
    }

    pub fn forward(&self, t: &ItemTables, schema: &FeatureSchema, x: &ItemInput) -> Result<Tensor> {
        l2_normalize(&self.mlp.forward(&self.input(t, schema, x)?)?)
    }

    /// The MLP's input: the id embedding and the item features, concatenated.
    pub fn input(&self, t: &ItemTables, schema: &FeatureSchema, x: &ItemInput) -> Result<Tensor> {
        let b = x.items.len();
        let mut parts = vec![t.item_id.lookup(&x.items)?];
        let dev = parts[0].device().clone();
        parts.extend(pool_fields(&t.item_feat, schema, &x.slots, b)?);
        if schema.numeric > 0 {
            parts.push(Tensor::from_slice(&x.numeric, (b, schema.numeric), &dev)?);
        }
        Tensor::cat(&parts, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_encodes_hour_and_weekday_periodically() {
        // 1970-01-05 was a Monday, midnight.
        let monday = 4 * 86_400;
        let c = context(monday);
        assert!((c[0] - 0.0).abs() < 1e-6 && (c[1] - 1.0).abs() < 1e-6);
        assert!((c[2] - 0.0).abs() < 1e-6 && (c[3] - 1.0).abs() < 1e-6);
        assert_eq!(context(monday + 7 * 86_400), c);
        let six_am = context(monday + 6 * 3_600);
        assert!((six_am[0] - 1.0).abs() < 1e-6);
    }
}
