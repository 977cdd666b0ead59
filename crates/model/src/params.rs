//! Parameter storage for training.
//!
//! Embedding tables are the bulk of a two-tower model (one row per item and per user), but a
//! batch touches only a few thousand rows. Letting autograd produce a dense gradient for the whole
//! table (and AdamW update every row) makes each step cost O(table) — the known candle CPU
//! bottleneck. So tables live here as host memory with per-row Adam moments: each step gathers the
//! rows it needs into a small leaf [`Var`], autograd differentiates only that, and
//! [`SparseTable::apply`] updates just those rows ("lazy" AdamW). Dense layers stay candle `Var`s
//! under candle's AdamW.

use std::collections::HashMap;

use candle_core::{Device, Result, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A standard normal sample (Box–Muller), so initialisation depends only on our seeded RNG.
pub fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

pub fn normal_vec(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| normal(rng) * std).collect()
}

#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// An embedding table trained with sparse (lazy) AdamW updates.
#[derive(Debug, Clone)]
pub struct SparseTable {
    pub rows: usize,
    pub dim: usize,
    pub data: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// The rows of a table that one step uses, as a differentiable leaf.
pub struct Gathered {
    pub leaf: Var,
    /// Table row of each leaf row.
    pub rows: Vec<u32>,
    local: HashMap<u32, u32>,
}

impl SparseTable {
    pub fn new(rows: usize, dim: usize, std: f32, rng: &mut ChaCha8Rng) -> SparseTable {
        SparseTable {
            rows,
            dim,
            data: normal_vec(rng, rows * dim, std),
            m: vec![0.0; rows * dim],
            v: vec![0.0; rows * dim],
        }
    }

    pub fn to_tensor(&self, dev: &Device) -> Result<Tensor> {
        Tensor::from_vec(self.data.clone(), (self.rows, self.dim), dev)
    }

    /// Gathers the distinct rows among `ids` into a leaf variable.
    pub fn gather<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a u32>,
        dev: &Device,
    ) -> Result<Gathered> {
        let mut local = HashMap::new();
        let mut rows = Vec::new();
        for &id in ids {
            local.entry(id).or_insert_with(|| {
                rows.push(id);
                (rows.len() - 1) as u32
            });
        }
        let mut buf = Vec::with_capacity(rows.len() * self.dim);
        for &r in &rows {
            let r = r as usize;
            buf.extend_from_slice(&self.data[r * self.dim..(r + 1) * self.dim]);
        }
        let leaf = Var::from_tensor(&Tensor::from_vec(buf, (rows.len(), self.dim), dev)?)?;
        Ok(Gathered { leaf, rows, local })
    }

    /// One lazy AdamW step on the gathered rows, given the gradient of the leaf.
    pub fn apply(&mut self, g: &Gathered, grad: &Tensor, opt: &AdamW, step: u64) -> Result<()> {
        let grad = grad.flatten_all()?.to_vec1::<f32>()?;
        let (b1, b2) = (opt.beta1, opt.beta2);
        let bc1 = 1.0 - b1.powi(step as i32);
        let bc2 = 1.0 - b2.powi(step as i32);
        let lr = opt.lr as f32;
        let decay = (1.0 - opt.lr * opt.weight_decay) as f32;
        for (k, &row) in g.rows.iter().enumerate() {
            let base = row as usize * self.dim;
            for d in 0..self.dim {
                let gi = grad[k * self.dim + d];
                let j = base + d;
                self.m[j] = (b1 as f32) * self.m[j] + (1.0 - b1 as f32) * gi;
                self.v[j] = (b2 as f32) * self.v[j] + (1.0 - b2 as f32) * gi * gi;
                let mh = self.m[j] / bc1 as f32;
                let vh = self.v[j] / bc2 as f32;
                self.data[j] = self.data[j] * decay - lr * mh / (vh.sqrt() + opt.eps as f32);
            }
        }
        Ok(())
    }
}

impl Gathered {
    /// Embeddings of `ids` (each must have been gathered), shape `(ids.len(), dim)`.
    pub fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        let local: Vec<u32> = ids.iter().map(|id| self.local[id]).collect();
        let idx = Tensor::from_vec(local, ids.len(), self.leaf.device())?;
        self.leaf.as_tensor().index_select(&idx, 0)
    }
}

/// Where a tower reads an embedding table from: the full table (inference) or the rows gathered
/// for one training step.
pub enum Table<'a> {
    Full(&'a Tensor),
    Gathered(&'a Gathered),
}

impl Table<'_> {
    /// The mean embedding of each row of `ids` (`b` rows of `width`, 0 = padding, skipped);
    /// rows with no id give zeros. On gathered rows this is one `(b × rows) · (rows × d)`
    /// product with a sparse-in-spirit weight matrix, instead of materialising `b · width`
    /// embeddings and their gradient.
    pub fn mean_pool(&self, ids: &[u32], b: usize, width: usize) -> Result<Tensor> {
        match self {
            Table::Full(t) => {
                let d = t.dim(1)?;
                let emb = self.lookup(ids)?.reshape((b, width, d))?;
                let mask: Vec<f32> = ids.iter().map(|&i| (i != 0) as u8 as f32).collect();
                let counts: Vec<f32> = mask
                    .chunks(width)
                    .map(|c| c.iter().sum::<f32>().max(1.0))
                    .collect();
                let mask = Tensor::from_vec(mask, (b, width, 1), t.device())?;
                let counts = Tensor::from_vec(counts, (b, 1), t.device())?;
                emb.broadcast_mul(&mask)?.sum(1)?.broadcast_div(&counts)
            }
            Table::Gathered(g) => {
                let rows = g.rows.len();
                let mut w = vec![0f32; b * rows];
                for (r, chunk) in ids.chunks(width).enumerate() {
                    let n = chunk.iter().filter(|&&i| i != 0).count();
                    if n == 0 {
                        continue;
                    }
                    let share = 1.0 / n as f32;
                    for &i in chunk.iter().filter(|&&i| i != 0) {
                        w[r * rows + g.local[&i] as usize] += share;
                    }
                }
                Tensor::from_vec(w, (b, rows), g.leaf.device())?.matmul(g.leaf.as_tensor())
            }
        }
    }

    pub fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Table::Full(t) => {
                let idx = Tensor::from_slice(ids, ids.len(), t.device())?;
                t.index_select(&idx, 0)
            }
            Table::Gathered(g) => g.lookup(ids),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn gathered_lookups_match_the_full_table_and_updates_touch_only_used_rows() {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut t = SparseTable::new(10, 4, 1.0, &mut rng);
        let full = t.to_tensor(&dev).unwrap();
        let ids = [7u32, 2, 7, 9];
        let g = t.gather(&ids, &dev).unwrap();
        let a = g.lookup(&ids).unwrap().to_vec2::<f32>().unwrap();
        let b = Table::Full(&full)
            .lookup(&ids)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(a, b);
        // Mean pooling agrees between the two forms (padding skipped, empty rows zero).
        let pool_ids = [7u32, 2, 0, 0, 0, 0, 9, 9, 2];
        let pg = Table::Gathered(&t.gather(&pool_ids, &dev).unwrap())
            .mean_pool(&pool_ids, 3, 3)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let pf = Table::Full(&full)
            .mean_pool(&pool_ids, 3, 3)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (x, y) in pg.iter().flatten().zip(pf.iter().flatten()) {
            assert!((x - y).abs() < 1e-6);
        }
        assert!(pg[1].iter().all(|&v| v == 0.0));
        let before = t.data.clone();
        let loss = g.lookup(&ids).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let opt = AdamW {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        t.apply(&g, grads.get(&g.leaf).unwrap(), &opt, 1).unwrap();
        for row in 0..10 {
            let changed = (0..4).any(|d| t.data[row * 4 + d] != before[row * 4 + d]);
            assert_eq!(changed, [2, 7, 9].contains(&row), "row {row}");
        }
        // A positive gradient with Adam's first step moves each weight by -lr.
        assert!((t.data[2 * 4] - (before[2 * 4] - 0.1)).abs() < 1e-4);
    }
}
