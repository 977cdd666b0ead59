//! The transformer user encoder: a causal self-attention stack over a user's last L items.
//!
//! Input at each position is the item's embedding (the shared item-id table) plus an embedding
//! of the time gap since the user's previous event. Attention is causal and masks padding;
//! positions enter as a learned per-head bias on the *relative* distance between query and key,
//! so the output at position t depends only on the items at or before t and how far back they
//! are — never on where the window happens to start. That is what lets training run every
//! prefix of a window in one pass while serving runs one window ending at the latest event, and
//! get the same function.
//!
//! Blocks are pre-LayerNorm: `x += Attn(LN(x))`, `x += FFN(LN(x))`, then a final LN.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand_chacha::ChaCha8Rng;

use crate::params::normal_vec;
use crate::towers::Linear;

/// Time-gap buckets: 0 = unknown (or no previous event), then powers of 4 seconds.
pub const GAP_BUCKETS: usize = 16;

/// The bucket of a gap between consecutive events, in seconds (`None`: unknown).
pub fn gap_bucket(gap: Option<i64>) -> u32 {
    match gap {
        None => 0,
        Some(g) => {
            let g = g.max(0) as f64;
            (1 + ((g + 1.0).log2() / 2.0).floor() as i64).clamp(1, GAP_BUCKETS as i64 - 1) as u32
        }
    }
}

/// Gap buckets of a chronological window (`ts[k]` the time of the k-th item; `before` the time
/// of the event preceding the window, if any).
pub fn gap_buckets(ts: &[i64], before: Option<i64>) -> Vec<u32> {
    ts.iter()
        .enumerate()
        .map(|(k, &t)| {
            let prev = if k == 0 { before } else { Some(ts[k - 1]) };
            gap_bucket(prev.map(|p| t - p))
        })
        .collect()
}

pub struct LayerNorm {
    pub gamma: Var,
    pub beta: Var,
}

impl LayerNorm {
    pub fn new(d: usize, dev: &Device) -> Result<Self> {
        Ok(LayerNorm {
            gamma: Var::from_tensor(&Tensor::ones(d, DType::F32, dev)?)?,
            beta: Var::from_tensor(&Tensor::zeros(d, DType::F32, dev)?)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        centred
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&self.gamma)?
            .broadcast_add(&self.beta)
    }
}

pub struct Block {
    pub ln1: LayerNorm,
    pub qkv: Linear,
    pub proj: Linear,
    pub ln2: LayerNorm,
    pub ff1: Linear,
    pub ff2: Linear,
}

pub struct SeqEncoder {
    pub heads: usize,
    /// Longest window (the relative-distance table's length).
    pub max_len: usize,
    pub gap_emb: Var,
    /// `(heads, max_len)`: attention bias by distance `query − key`.
    pub rel_bias: Var,
    pub blocks: Vec<Block>,
    pub ln_f: LayerNorm,
}

/// Applied to activations while training (dropout); identity at inference.
pub type Regularize<'a> = &'a mut dyn FnMut(&Tensor) -> Result<Tensor>;

impl SeqEncoder {
    pub fn new(
        d: usize,
        heads: usize,
        layers: usize,
        max_len: usize,
        rng: &mut ChaCha8Rng,
        dev: &Device,
    ) -> Result<Self> {
        let heads = heads.max(1);
        if !d.is_multiple_of(heads) {
            candle_core::bail!("the id dimension {d} must be a multiple of the {heads} heads");
        }
        let std = (1.0 / d as f32).sqrt();
        let blocks = (0..layers.max(1))
            .map(|_| {
                Ok(Block {
                    ln1: LayerNorm::new(d, dev)?,
                    qkv: Linear::new(d, 3 * d, std, rng, dev)?,
                    proj: Linear::new(d, d, std, rng, dev)?,
                    ln2: LayerNorm::new(d, dev)?,
                    ff1: Linear::new(d, 2 * d, (2.0 / d as f32).sqrt(), rng, dev)?,
                    ff2: Linear::new(2 * d, d, (1.0 / (2 * d) as f32).sqrt(), rng, dev)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SeqEncoder {
            heads,
            max_len: max_len.max(1),
            gap_emb: Var::from_tensor(&Tensor::from_vec(
                normal_vec(rng, GAP_BUCKETS * d, 0.02),
                (GAP_BUCKETS, d),
                dev,
            )?)?,
            rel_bias: Var::from_tensor(&Tensor::zeros((heads, max_len.max(1)), DType::F32, dev)?)?,
            blocks,
            ln_f: LayerNorm::new(d, dev)?,
        })
    }

    pub fn named_vars(&self, prefix: &str) -> Vec<(String, Var)> {
        let mut v = vec![
            (format!("{prefix}.gap_emb"), self.gap_emb.clone()),
            (format!("{prefix}.rel_bias"), self.rel_bias.clone()),
            (format!("{prefix}.ln_f.gamma"), self.ln_f.gamma.clone()),
            (format!("{prefix}.ln_f.beta"), self.ln_f.beta.clone()),
        ];
        for (k, b) in self.blocks.iter().enumerate() {
            let p = format!("{prefix}.{k}");
            for (name, l) in [("ln1", &b.ln1), ("ln2", &b.ln2)] {
                v.push((format!("{p}.{name}.gamma"), l.gamma.clone()));
                v.push((format!("{p}.{name}.beta"), l.beta.clone()));
            }
            for (name, l) in [
                ("qkv", &b.qkv),
                ("proj", &b.proj),
                ("ff1", &b.ff1),
                ("ff2", &b.ff2),
            ] {
                v.push((format!("{p}.{name}.weight"), l.weight.clone()));
                v.push((format!("{p}.{name}.bias"), l.bias.clone()));
            }
        }
        v
    }

    /// Encodes `b` windows of `t` positions: `emb` `(b·t, d)` item embeddings, `ids` the item
    /// ids (0 = padding, masked as a key) and `gaps` their gap buckets, both `b·t`. Returns
    /// `(b, t, d)`; the output at a position sees only that position and earlier ones.
    pub fn forward(
        &self,
        emb: &Tensor,
        ids: &[u32],
        gaps: &[u32],
        b: usize,
        t: usize,
        reg: Regularize,
    ) -> Result<Tensor> {
        let d = emb.dim(1)?;
        let dev = emb.device();
        let h = self.heads;
        let dh = d / h;
        let gap_idx = Tensor::from_slice(gaps, gaps.len(), dev)?;
        let mut x = (emb + self.gap_emb.as_tensor().index_select(&gap_idx, 0)?)?;
        x = reg(&x)?;
        // Causal + padding mask, and the relative-distance bias, shared by every block.
        let mut mask = vec![0f32; b * t * t];
        for r in 0..b {
            for q in 0..t {
                for k in 0..t {
                    if k > q || ids[r * t + k] == 0 {
                        mask[(r * t + q) * t + k] = -1e9;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, t), dev)?;
        let dist: Vec<u32> = (0..t)
            .flat_map(|q| (0..t).map(move |k| q.saturating_sub(k) as u32))
            .map(|dd| dd.min(self.max_len as u32 - 1))
            .collect();
        let rel = self
            .rel_bias
            .as_tensor()
            .index_select(&Tensor::from_vec(dist, t * t, dev)?, 1)?
            .reshape((1, h, t, t))?;
        let scale = 1.0 / (dh as f64).sqrt();
        for blk in &self.blocks {
            let y = blk.ln1.forward(&x)?;
            let qkv = blk.qkv.forward(&y)?.reshape((b, t, 3, h, dh))?;
            let split = |i: usize| -> Result<Tensor> {
                qkv.narrow(2, i, 1)?
                    .squeeze(2)?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? * scale)?
                .broadcast_add(&rel)?
                .broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax_last_dim(&scores)?;
            let o = att
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * t, d))?;
            x = (x + reg(&blk.proj.forward(&o)?)?)?;
            let y = blk.ln2.forward(&x)?;
            let f = blk.ff2.forward(&blk.ff1.forward(&y)?.relu()?)?;
            x = (x + reg(&f)?)?;
        }
        self.ln_f.forward(&x)?.reshape((b, t, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn encoder() -> SeqEncoder {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        SeqEncoder::new(8, 2, 2, 6, &mut rng, &Device::Cpu).unwrap()
    }

    fn run(enc: &SeqEncoder, ids: &[u32], gaps: &[u32], b: usize, t: usize) -> Vec<Vec<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let table =
            Tensor::from_vec(normal_vec(&mut rng, 10 * 8, 1.0), (10, 8), &Device::Cpu).unwrap();
        let emb = table
            .index_select(
                &Tensor::from_slice(ids, ids.len(), &Device::Cpu).unwrap(),
                0,
            )
            .unwrap();
        enc.forward(&emb, ids, gaps, b, t, &mut |x| Ok(x.clone()))
            .unwrap()
            .reshape((b * t, 8))
            .unwrap()
            .to_vec2()
            .unwrap()
    }

    #[test]
    fn position_t_never_sees_position_t_plus_one() {
        let enc = encoder();
        let a = run(&enc, &[3, 4, 5, 6, 7, 8], &[0, 1, 2, 3, 4, 5], 1, 6);
        // Change the items (and gaps) from position 3 on: outputs 0..=2 must not move.
        let b = run(&enc, &[3, 4, 5, 9, 1, 2], &[0, 1, 2, 7, 7, 7], 1, 6);
        for p in 0..3 {
            assert_eq!(a[p], b[p], "position {p} saw the future");
        }
        assert_ne!(a[3], b[3]);
    }

    #[test]
    fn a_prefix_run_in_one_pass_equals_the_same_window_run_alone() {
        // Training runs all prefixes of one window; serving runs a left-padded window that ends
        // at the prefix's last item. Relative positions make them the same function.
        let enc = encoder();
        let full = run(&enc, &[3, 4, 5, 6, 7, 8], &[0, 1, 2, 3, 4, 5], 1, 6);
        let alone = run(&enc, &[0, 0, 0, 3, 4, 5], &[0, 0, 0, 0, 1, 2], 1, 6);
        for (x, y) in full[2].iter().zip(&alone[5]) {
            assert!((x - y).abs() < 1e-5, "{:?} vs {:?}", full[2], alone[5]);
        }
    }

    #[test]
    fn gaps_fall_into_log_scale_buckets() {
        assert_eq!(gap_bucket(None), 0);
        assert_eq!(gap_bucket(Some(0)), 1);
        assert_eq!(gap_bucket(Some(3)), 2);
        assert_eq!(gap_bucket(Some(86_400)), 9);
        assert_eq!(gap_bucket(Some(i64::MAX / 2)), GAP_BUCKETS as u32 - 1);
        assert_eq!(gap_buckets(&[10, 13, 13], Some(10)), vec![1, 2, 1]);
    }
}
