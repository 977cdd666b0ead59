//! The user tower's serving forward for one request at a time, without building a candle
//! graph: the mean-pooling encoder's input assembled row by row from plain copies of the
//! tables, then the MLP as dot products over weights laid out row-major at load.
//!
//! candle pays a few microseconds per op (tensor allocation, layout checks, a dispatch); the
//! tower is about thirty ops for one user, which made it most of the user tower's CPU per
//! request. The arithmetic here is the same as [`crate::towers::UserTower::forward`] (same
//! parts, same order, same masking), so the two agree to float rounding; tests hold them to
//! 1e-6. Other encoders (attention, transformer) keep the candle path.

use candle_core::Tensor;
use tandem_types::vector::dot;

use crate::config::UserEncoder;
use crate::towers::{UserInput, CONTEXT_DIM};
use crate::Result;

/// One linear layer: `out × inp` weights row-major (row `o` is output `o`'s), and biases.
struct Dense {
    inp: usize,
    w: Vec<f32>,
    b: Vec<f32>,
}

/// A user tower ready for [`FusedUser::forward`].
pub struct FusedUser {
    id_dim: usize,
    feature_dim: usize,
    history: usize,
    long_history: usize,
    use_user_id: bool,
    numeric: usize,
    slot_width: usize,
    /// `(start, width)` of every categorical field in a row's slots.
    fields: Vec<(usize, usize)>,
    id_emb: Vec<f32>,
    feat_emb: Vec<f32>,
    hist_emb: Vec<f32>,
    layers: Vec<Dense>,
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Row `id` of a row-major table of `d` columns, or nothing for a row it does not hold.
#[inline]
fn row_of(table: &[f32], d: usize, id: u32) -> Option<&[f32]> {
    table.get(id as usize * d..(id as usize + 1) * d)
}

/// Appends `width` zeros to `out` and returns them.
fn grow(out: &mut Vec<f32>, width: usize) -> &mut [f32] {
    let s = out.len();
    out.resize(s + width, 0.0);
    &mut out[s..]
}

/// Writes the mean of the rows of `ids` that are not 0 (padding) to `out`, which holds zeros;
/// when every id is padding it stays zeros.
fn masked_mean(table: &[f32], d: usize, ids: &[u32], out: &mut [f32]) {
    let live = ids.iter().filter(|&&i| i != 0).count();
    if live == 0 {
        return;
    }
    for &i in ids.iter().filter(|&&i| i != 0) {
        if let Some(r) = row_of(table, d, i) {
            out.iter_mut().zip(r).for_each(|(o, x)| *o += x);
        }
    }
    let n = live as f32;
    out.iter_mut().for_each(|o| *o /= n);
}

impl FusedUser {
    /// The fused form of `model`'s user tower, or `None` for encoders it does not cover.
    pub fn new(model: &crate::UserModel) -> Result<Option<Self>> {
        let cfg = &model.cfg;
        let tower = &model.tower;
        if cfg.user_encoder != UserEncoder::Mean
            || tower.attn_query.is_some()
            || tower.seq.is_some()
        {
            return Ok(None);
        }
        let schema = &model.users.schema;
        let layers = tower
            .mlp
            .layers
            .iter()
            .map(|l| {
                let w = l.weight.as_tensor();
                Ok(Dense {
                    inp: w.dim(1)?,
                    w: flat(w)?,
                    b: flat(l.bias.as_tensor())?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(FusedUser {
            id_dim: cfg.id_dim,
            feature_dim: cfg.feature_dim,
            history: cfg.history,
            long_history: cfg.long_history,
            use_user_id: cfg.use_user_id,
            numeric: schema.numeric,
            slot_width: schema.slot_width,
            fields: schema.cat_fields().map(|(s, f)| (s, f.width)).collect(),
            id_emb: flat(&model.id_emb)?,
            feat_emb: flat(&model.feat_emb)?,
            hist_emb: flat(&model.history_emb)?,
            layers,
        }))
    }

    /// The MLP's input for row `r` of `x`, in [`crate::towers::UserTower::input`]'s order.
    fn input(&self, x: &UserInput, r: usize, out: &mut Vec<f32>) {
        out.clear();
        if self.use_user_id {
            let at = grow(out, self.id_dim);
            if let Some(v) = row_of(&self.id_emb, self.id_dim, x.users[r]) {
                at.copy_from_slice(v);
            }
        }
        for &(start, width) in &self.fields {
            let ids = &x.slots[r * self.slot_width + start..r * self.slot_width + start + width];
            let at = grow(out, self.feature_dim);
            if width == 1 {
                // A single-valued field is looked up as it is (row 0 included).
                if let Some(v) = row_of(&self.feat_emb, self.feature_dim, ids[0]) {
                    at.copy_from_slice(v);
                }
            } else {
                masked_mean(&self.feat_emb, self.feature_dim, ids, at);
            }
        }
        if self.numeric > 0 {
            out.extend_from_slice(&x.numeric[r * self.numeric..(r + 1) * self.numeric]);
        }
        let l = self.history;
        let recent = &x.history[r * l..(r + 1) * l];
        masked_mean(&self.hist_emb, self.id_dim, recent, grow(out, self.id_dim));
        // The most recent item on its own (nothing when the history is empty).
        masked_mean(
            &self.hist_emb,
            self.id_dim,
            &recent[..1],
            grow(out, self.id_dim),
        );
        let h = self.long_history;
        if h > 0 {
            let long = &x.long[r * h..(r + 1) * h];
            masked_mean(&self.hist_emb, self.id_dim, long, grow(out, self.id_dim));
        }
        out.extend_from_slice(&x.context[r * CONTEXT_DIM..(r + 1) * CONTEXT_DIM]);
    }

    /// The L2-normalised embeddings of every row of `x`, row-major.
    pub fn forward(&self, x: &UserInput) -> Vec<f32> {
        let mut out = Vec::new();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for r in 0..x.len() {
            self.input(x, r, &mut a);
            for (k, layer) in self.layers.iter().enumerate() {
                b.clear();
                b.extend(
                    layer
                        .b
                        .iter()
                        .zip(layer.w.chunks_exact(layer.inp))
                        .map(|(bias, w)| {
                            let y = bias + dot(w, &a);
                            if k + 1 < self.layers.len() {
                                y.max(0.0)
                            } else {
                                y
                            }
                        }),
                );
                std::mem::swap(&mut a, &mut b);
            }
            let norm = (a.iter().map(|v| v * v).sum::<f32>() + 1e-12).sqrt();
            out.extend(a.iter().map(|v| v / norm));
        }
        out
    }
}
