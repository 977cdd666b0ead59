//! Parameter storage for training.
//!
//! Embedding tables are the bulk of a two-tower model (one row per item and per user), but a
//! batch touches only a few thousand rows. Letting autograd produce a dense gradient for the whole
//! table (and AdamW update every row) makes each step cost O(table) — the known candle CPU
//! bottleneck. So tables live here as host memory with per-row Adam moments: each step gathers the
//! rows it needs into a small leaf [`Var`], autograd differentiates only that, and
//! [`SparseTable::apply`] updates just those rows ("lazy" AdamW). Dense layers stay candle `Var`s
//! under candle's AdamW.

use candle_core::{Device, Result, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::rowmix::{cpu_f32, mix, RowMix};

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

impl From<AdamW> for candle_nn::ParamsAdamW {
    fn from(o: AdamW) -> Self {
        candle_nn::ParamsAdamW {
            lr: o.lr,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
        }
    }
}

/// An embedding table trained with sparse (lazy) AdamW updates.
pub struct SparseTable {
    pub rows: usize,
    pub dim: usize,
    /// The weights and Adam moments in host memory (empty once the table moved to a GPU).
    pub data: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    /// GPU training: the table and its moments live on the device, gathered and updated there.
    #[cfg(feature = "cuda")]
    gpu: Option<crate::cuda::DeviceTable>,
}

/// The rows of a table that one step uses, as a differentiable leaf. Lookups into it take
/// leaf rows: the ids a [`RowPlanner`] renumbered.
pub struct Gathered {
    pub leaf: Var,
    /// Table row of each leaf row, increasing.
    pub rows: Vec<u32>,
}

/// Finds the distinct table rows a step reads and renumbers the step's ids to leaf rows, off
/// the step's path (on a GPU, on the thread that prepares batches ahead).
///
/// Rows are found with a bit per table row (set for each id, then scanned in order and
/// cleared) and located with a dense position array, so a step costs `O(ids + rows / 64)`
/// with no sorting or hashing of the ids: at 400k history ids over a million-row table,
/// sorting and a hash map were most of a GPU step's host time. Row 0 (padding, the
/// out-of-vocabulary row) is always among the rows, and as the smallest it stays 0, so
/// "0 = padding" holds for renumbered ids too.
pub struct RowPlanner {
    rows: usize,
    marks: Vec<u64>,
    slot: Vec<u32>,
}

impl RowPlanner {
    /// A planner for a table of `rows` rows (its scratch is allocated on first use).
    pub fn new(rows: usize) -> RowPlanner {
        RowPlanner {
            rows,
            marks: Vec::new(),
            slot: Vec::new(),
        }
    }

    /// The distinct rows among `lists` and row 0, increasing; every id in `lists` is rewritten
    /// to its position among them. An id outside the table is an error and rewrites nothing.
    pub fn plan(&mut self, lists: &mut [&mut [u32]]) -> Result<Vec<u32>> {
        let words = self.rows.max(1).div_ceil(64);
        if self.marks.len() != words {
            self.marks = vec![0; words];
        }
        self.marks[0] |= 1;
        for &id in lists.iter().flat_map(|l| l.iter()) {
            if id as usize >= self.rows {
                // Leave the scratch clean for the next plan.
                self.marks.iter_mut().for_each(|w| *w = 0);
                candle_core::bail!("row {id} of a table of {} rows", self.rows);
            }
            self.marks[id as usize >> 6] |= 1 << (id & 63);
        }
        let mut rows = Vec::new();
        for (w, word) in self.marks.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                rows.push((w * 64) as u32 + bits.trailing_zeros());
                bits &= bits - 1;
            }
        }
        self.slot.resize(self.rows.max(1), 0);
        for (k, &r) in rows.iter().enumerate() {
            self.slot[r as usize] = k as u32;
        }
        for id in lists.iter_mut().flat_map(|l| l.iter_mut()) {
            *id = self.slot[*id as usize];
        }
        Ok(rows)
    }
}

impl SparseTable {
    pub fn new(rows: usize, dim: usize, std: f32, rng: &mut ChaCha8Rng) -> SparseTable {
        SparseTable {
            rows,
            dim,
            data: normal_vec(rng, rows * dim, std),
            m: vec![0.0; rows * dim],
            v: vec![0.0; rows * dim],
            #[cfg(feature = "cuda")]
            gpu: None,
        }
    }

    /// Moves the table to `dev` when that is a GPU (a no-op on the CPU).
    pub fn place(&mut self, dev: &Device) -> Result<()> {
        #[cfg(feature = "cuda")]
        if dev.is_cuda() && self.gpu.is_none() {
            let data = std::mem::take(&mut self.data);
            self.gpu = Some(crate::cuda::DeviceTable::new(
                data, self.rows, self.dim, dev,
            )?);
            self.m = Vec::new();
            self.v = Vec::new();
        }
        #[cfg(not(feature = "cuda"))]
        let _ = dev;
        Ok(())
    }

    pub fn to_tensor(&self, dev: &Device) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.weights.to_device(dev);
        }
        Tensor::from_vec(self.data.clone(), (self.rows, self.dim), dev)
    }

    /// Gathers `rows` (distinct, increasing, as a [`RowPlanner`] lists them) into a leaf
    /// variable whose row `k` is table row `rows[k]`.
    pub fn gather(&self, rows: Vec<u32>, dev: &Device) -> Result<Gathered> {
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= self.rows) {
            candle_core::bail!("row {r} of a table of {} rows", self.rows);
        }
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            let leaf = Var::from_tensor(&gpu.gather(&rows)?)?;
            return Ok(Gathered { leaf, rows });
        }
        let mut buf = Vec::with_capacity(rows.len() * self.dim);
        for &r in &rows {
            let r = r as usize;
            buf.extend_from_slice(&self.data[r * self.dim..(r + 1) * self.dim]);
        }
        let leaf = Var::from_tensor(&Tensor::from_vec(buf, (rows.len(), self.dim), dev)?)?;
        Ok(Gathered { leaf, rows })
    }

    /// One lazy AdamW step on the gathered rows, given the gradient of the leaf, in place and
    /// in parallel.
    pub fn apply(&mut self, g: &Gathered, grad: &Tensor, opt: &AdamW, step: u64) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &mut self.gpu {
            return gpu.apply(&g.rows, grad, &RowStep::new(opt, step));
        }
        let grad = grad.contiguous()?;
        let (storage, layout) = grad.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("a host gradient was expected");
        };
        let grad = cpu_f32(cpu, layout, "the sparse table update")?;
        let dim = self.dim;
        if grad.len() != g.rows.len() * dim {
            candle_core::bail!(
                "gradient of {} values for {} rows of {dim}",
                grad.len(),
                g.rows.len()
            );
        }
        let step = RowStep::new(opt, step);
        // Gathered rows are sorted and distinct, so the three buffers split into disjoint
        // mutable rows that threads can update independently.
        let w = rows_mut(&mut self.data, &g.rows, dim);
        let m = rows_mut(&mut self.m, &g.rows, dim);
        let v = rows_mut(&mut self.v, &g.rows, dim);
        let work = w.into_par_iter().zip(m).zip(v).zip(grad.par_chunks(dim));
        work.with_min_len((1 << 14) / dim.max(1))
            .for_each(|(((w, m), v), g)| step.update(w, m, v, g));
        Ok(())
    }
}

/// The rows `rows` (sorted, distinct) of a row-major buffer of width `dim`, as disjoint
/// mutable slices.
fn rows_mut<'a>(buf: &'a mut [f32], rows: &[u32], dim: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(rows.len());
    let mut rest = buf;
    let mut at = 0;
    for &r in rows {
        let r = r as usize;
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((r - at) * dim);
        let (row, tail) = tail.split_at_mut(dim);
        out.push(row);
        rest = tail;
        at = r + 1;
    }
    out
}

/// AdamW's constants for one step, bias corrections folded in.
pub(crate) struct RowStep {
    pub b1: f32,
    pub b2: f32,
    /// `lr / (1 − β1^t)`.
    pub lr_c: f32,
    /// `1 / sqrt(1 − β2^t)`.
    pub v_c: f32,
    pub eps: f32,
    pub decay: f32,
}

impl RowStep {
    pub(crate) fn new(opt: &AdamW, step: u64) -> RowStep {
        let bc1 = 1.0 - opt.beta1.powi(step as i32);
        let bc2 = 1.0 - opt.beta2.powi(step as i32);
        RowStep {
            b1: opt.beta1 as f32,
            b2: opt.beta2 as f32,
            lr_c: (opt.lr / bc1) as f32,
            v_c: (1.0 / bc2.sqrt()) as f32,
            eps: opt.eps as f32,
            decay: (1.0 - opt.lr * opt.weight_decay) as f32,
        }
    }

    fn update(&self, w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for (((w, m), v), &g) in w.iter_mut().zip(m).zip(v).zip(g) {
            *m = self.b1 * *m + (1.0 - self.b1) * g;
            *v = self.b2 * *v + (1.0 - self.b2) * g * g;
            *w = *w * self.decay - self.lr_c * *m / (v.sqrt() * self.v_c + self.eps);
        }
    }
}

impl Gathered {
    /// Embeddings of leaf rows `ids`, shape `(ids.len(), dim)`; a row past the leaf's is an
    /// error ([`mix`] checks every entry).
    pub fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        let mut m = RowMix::new(self.rows.len());
        for &id in ids {
            m.push(id, 1.0);
            m.end_row();
        }
        mix(self.leaf.as_tensor(), m)
    }

    /// The mean embedding of each row of `ids` (`b` rows of `width`, 0 = padding, skipped);
    /// rows with no id give zeros; a row past the leaf's is an error, as in [`Gathered::lookup`].
    pub fn mean_pool(&self, ids: &[u32], width: usize) -> Result<Tensor> {
        let width = width.max(1);
        let m = RowMix::build(self.rows.len(), ids.len().div_ceil(width), |r, out| {
            let chunk = &ids[r * width..((r + 1) * width).min(ids.len())];
            let n = chunk.iter().filter(|&&i| i != 0).count();
            let share = 1.0 / n.max(1) as f32;
            for &i in chunk.iter().filter(|&&i| i != 0) {
                out.push((i, share));
            }
        });
        mix(self.leaf.as_tensor(), m)
    }
}

/// Where a tower reads an embedding table from: the full table (inference, ids are table rows)
/// or the rows gathered for one training step (ids are leaf rows, renumbered by a
/// [`RowPlanner`]).
pub enum Table<'a> {
    Full(&'a Tensor),
    Gathered(&'a Gathered),
}

impl Table<'_> {
    /// The mean embedding of each row of `ids` (`b` rows of `width`, 0 = padding, skipped);
    /// rows with no id give zeros. On gathered rows this is one sparse row mix (a gather in
    /// both directions), instead of materialising `b · width` embeddings and their gradient.
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
                debug_assert_eq!(ids.len(), b * width);
                g.mean_pool(ids, width)
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
    fn plans_find_rows_across_mark_words_renumber_ids_and_reuse_their_scratch() {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let t = SparseTable::new(200, 3, 1.0, &mut rng);
        let full = t.to_tensor(&dev).unwrap();
        let want = |ids: &[u32]| {
            Table::Full(&full)
                .lookup(ids)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        let mut planner = RowPlanner::new(200);
        // Ids on both sides of 64-bit word boundaries, repeated and unordered, in two lists.
        let a = [128u32, 63, 0, 64, 199];
        let b = [127u32, 63, 1];
        let (mut la, mut lb) = (a, b);
        let rows = planner.plan(&mut [&mut la, &mut lb]).unwrap();
        assert_eq!(rows, vec![0, 1, 63, 64, 127, 128, 199]);
        assert_eq!(la, [5, 2, 0, 3, 6]);
        assert_eq!(lb, [4, 2, 1]);
        let g = t.gather(rows, &dev).unwrap();
        assert_eq!(g.lookup(&la).unwrap().to_vec2::<f32>().unwrap(), want(&a));
        assert_eq!(g.lookup(&lb).unwrap().to_vec2::<f32>().unwrap(), want(&b));
        // A different set through the same scratch: row 0 is always planned (and stays 0),
        // nothing of the last plan lingers.
        let mut c = [65u32, 5, 199];
        let rows = planner.plan(&mut [&mut c]).unwrap();
        assert_eq!(rows, vec![0, 5, 65, 199]);
        assert_eq!(c, [2, 1, 3]);
        let g = t.gather(rows, &dev).unwrap();
        assert_eq!(
            g.lookup(&c).unwrap().to_vec2::<f32>().unwrap(),
            want(&[65, 5, 199])
        );
        assert!(g.lookup(&[4]).is_err(), "only 4 rows were gathered");
        assert!(
            g.mean_pool(&[1, 4], 2).is_err(),
            "only 4 rows were gathered"
        );
        // A row outside the table is an error, rewrites nothing and leaves the marks clean.
        let mut d = [3u32, 200];
        assert!(planner.plan(&mut [&mut d]).is_err());
        assert_eq!(d, [3, 200]);
        let mut e = [7u32];
        assert_eq!(planner.plan(&mut [&mut e]).unwrap(), vec![0, 7]);
        assert!(t.gather(vec![0, 200], &dev).is_err());
    }

    #[test]
    fn gathered_lookups_match_the_full_table_and_updates_touch_only_used_rows() {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut t = SparseTable::new(10, 4, 1.0, &mut rng);
        let full = t.to_tensor(&dev).unwrap();
        let mut planner = RowPlanner::new(10);
        let ids = [7u32, 2, 7, 9];
        let mut local = ids;
        let g = t
            .gather(planner.plan(&mut [&mut local]).unwrap(), &dev)
            .unwrap();
        let a = g.lookup(&local).unwrap().to_vec2::<f32>().unwrap();
        let b = Table::Full(&full)
            .lookup(&ids)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(a, b);
        // Mean pooling agrees between the two forms (padding skipped, empty rows zero).
        let pool_ids = [7u32, 2, 0, 0, 0, 0, 9, 9, 2];
        let mut pool_local = pool_ids;
        let pool_rows = planner.plan(&mut [&mut pool_local]).unwrap();
        let pg = Table::Gathered(&t.gather(pool_rows, &dev).unwrap())
            .mean_pool(&pool_local, 3, 3)
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
        let loss = g.lookup(&local).unwrap().sum_all().unwrap();
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
