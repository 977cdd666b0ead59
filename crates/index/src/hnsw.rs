//! A hierarchical navigable small-world graph (Malkov & Yashunin, 2018) specialised for
//! L2-normalised vectors and inner-product similarity.
//!
//! Differences from a general-purpose HNSW, all for speed on 64-d normalised embeddings:
//! vectors are stored in one contiguous array; distance is `-<a, b>` (monotone in cosine distance
//! for unit vectors) computed with eight independent accumulators so it vectorises; layer-0 links
//! live in one flat array of `2·M` slots per node; `ef` is a per-query argument.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{AnnIndex, HnswParams, IndexError, Result};

/// Inner product with eight accumulators (lets the compiler use SIMD lanes).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Cand {
    d: f32,
    id: u32,
}

impl Eq for Cand {}

impl Ord for Cand {
    fn cmp(&self, o: &Self) -> Ordering {
        self.d.total_cmp(&o.d).then(self.id.cmp(&o.id))
    }
}

impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// Visited marks stamped with a generation, so a search never clears the array.
struct Visited {
    marks: Vec<u32>,
    generation: u32,
}

impl Visited {
    fn new(n: usize) -> Self {
        Visited {
            marks: vec![0; n],
            generation: 0,
        }
    }

    fn reset(&mut self, n: usize) {
        if self.marks.len() < n {
            self.marks.resize(n, 0);
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.marks.iter_mut().for_each(|m| *m = 0);
            self.generation = 1;
        }
    }

    /// True the first time `id` is seen in this generation.
    #[inline]
    fn insert(&mut self, id: u32) -> bool {
        let m = &mut self.marks[id as usize];
        if *m == self.generation {
            false
        } else {
            *m = self.generation;
            true
        }
    }
}

thread_local! {
    static VISITED: std::cell::RefCell<Visited> = std::cell::RefCell::new(Visited::new(0));
}

pub struct Hnsw {
    dim: usize,
    m: usize,
    m0: usize,
    ef_construction: usize,
    ef_search: usize,
    vectors: Vec<f32>,
    levels: Vec<u8>,
    /// `n × m0` layer-0 neighbours; `len0[v]` of them are valid.
    links0: Vec<u32>,
    len0: Vec<u16>,
    /// Per node, its neighbour lists on layers 1..=level.
    upper: Vec<Vec<Vec<u32>>>,
    entry: u32,
    max_level: usize,
}

impl Hnsw {
    /// Builds the graph over `vectors` (`n × dim`, row-major, expected L2-normalised) by
    /// inserting the points in order; the result depends only on the data and `params.seed`.
    pub fn build(vectors: Vec<f32>, dim: usize, params: &HnswParams) -> Result<Self> {
        if dim == 0 || !vectors.len().is_multiple_of(dim) {
            return Err(IndexError::Invalid(format!(
                "{} values do not form vectors of dimension {dim}",
                vectors.len()
            )));
        }
        let n = vectors.len() / dim;
        let m = params.m.max(2);
        let mut h = Hnsw {
            dim,
            m,
            m0: 2 * m,
            ef_construction: params.ef_construction.max(m),
            ef_search: params.ef_search,
            vectors,
            levels: Vec::with_capacity(n),
            links0: vec![0; n * 2 * m],
            len0: vec![0; n],
            upper: Vec::with_capacity(n),
            entry: 0,
            max_level: 0,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        let ml = 1.0 / (m as f64).ln();
        for _ in 0..n {
            let r: f64 = rng.random::<f64>().max(1e-300);
            let level = ((-r.ln() * ml).floor() as usize).min(15);
            h.levels.push(level as u8);
            h.upper.push(vec![Vec::new(); level]);
        }
        let mut visited = Visited::new(n);
        for v in 0..n as u32 {
            h.insert(v, &mut visited);
        }
        Ok(h)
    }

    #[inline]
    fn vec(&self, id: u32) -> &[f32] {
        let s = id as usize * self.dim;
        &self.vectors[s..s + self.dim]
    }

    #[inline]
    fn dist(&self, q: &[f32], id: u32) -> f32 {
        -dot(q, self.vec(id))
    }

    fn neighbours(&self, id: u32, layer: usize) -> &[u32] {
        if layer == 0 {
            let s = id as usize * self.m0;
            &self.links0[s..s + self.len0[id as usize] as usize]
        } else {
            &self.upper[id as usize][layer - 1]
        }
    }

    fn set_neighbours(&mut self, id: u32, layer: usize, links: &[u32]) {
        if layer == 0 {
            let s = id as usize * self.m0;
            self.links0[s..s + links.len()].copy_from_slice(links);
            self.len0[id as usize] = links.len() as u16;
        } else {
            self.upper[id as usize][layer - 1] = links.to_vec();
        }
    }

    fn search_layer(
        &self,
        q: &[f32],
        entry: &[Cand],
        ef: usize,
        layer: usize,
        visited: &mut Visited,
    ) -> Vec<Cand> {
        let mut candidates: BinaryHeap<Reverse<Cand>> = BinaryHeap::with_capacity(ef * 2);
        let mut results: BinaryHeap<Cand> = BinaryHeap::with_capacity(ef + 1);
        for &e in entry {
            if visited.insert(e.id) {
                candidates.push(Reverse(e));
                results.push(e);
            }
        }
        while let Some(Reverse(c)) = candidates.pop() {
            let worst = results.peek().map_or(f32::INFINITY, |r| r.d);
            if c.d > worst && results.len() >= ef {
                break;
            }
            for &nb in self.neighbours(c.id, layer) {
                if !visited.insert(nb) {
                    continue;
                }
                let d = self.dist(q, nb);
                if results.len() < ef || d < results.peek().map_or(f32::INFINITY, |r| r.d) {
                    let cand = Cand { d, id: nb };
                    candidates.push(Reverse(cand));
                    results.push(cand);
                    if results.len() > ef {
                        results.pop();
                    }
                }
            }
        }
        results.into_sorted_vec()
    }

    /// The paper's neighbour-selection heuristic: walk candidates from nearest and keep one only
    /// if it is closer to the base point than to every neighbour already kept. This keeps links
    /// pointing in diverse directions, which is what lets clustered data stay navigable.
    fn select(&self, sorted: &[Cand], m: usize) -> Vec<u32> {
        let mut kept: Vec<u32> = Vec::with_capacity(m);
        for c in sorted {
            if kept.len() >= m {
                break;
            }
            let cv = self.vec(c.id);
            if kept.iter().all(|&s| -dot(cv, self.vec(s)) > c.d) {
                kept.push(c.id);
            }
        }
        kept
    }

    fn insert(&mut self, v: u32, visited: &mut Visited) {
        let level = self.levels[v as usize] as usize;
        if v == 0 {
            self.entry = 0;
            self.max_level = level;
            return;
        }
        let q = self.vec(v).to_vec();
        let mut ep = vec![Cand {
            d: self.dist(&q, self.entry),
            id: self.entry,
        }];
        for layer in (level + 1..=self.max_level).rev() {
            visited.reset(self.levels.len());
            ep = self.search_layer(&q, &ep, 1, layer, visited);
            ep.truncate(1);
        }
        for layer in (0..=level.min(self.max_level)).rev() {
            visited.reset(self.levels.len());
            let found = self.search_layer(&q, &ep, self.ef_construction, layer, visited);
            let max_links = if layer == 0 { self.m0 } else { self.m };
            let chosen = self.select(&found, self.m);
            self.set_neighbours(v, layer, &chosen);
            for &nb in &chosen {
                self.link(nb, v, layer, max_links);
            }
            ep = found;
        }
        if level > self.max_level {
            self.max_level = level;
            self.entry = v;
        }
    }

    /// Adds the reverse link `from → to`, re-selecting `from`'s neighbours when the list is full.
    fn link(&mut self, from: u32, to: u32, layer: usize, max_links: usize) {
        let current = self.neighbours(from, layer);
        if current.len() < max_links {
            let mut next = current.to_vec();
            next.push(to);
            self.set_neighbours(from, layer, &next);
            return;
        }
        let base = self.vec(from).to_vec();
        let mut cands: Vec<Cand> = current
            .iter()
            .chain(std::iter::once(&to))
            .map(|&id| Cand {
                d: self.dist(&base, id),
                id,
            })
            .collect();
        cands.sort_unstable();
        let kept = self.select(&cands, max_links);
        self.set_neighbours(from, layer, &kept);
    }

    /// Serialises the graph and vectors (little-endian).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.vectors.len() * 4 + self.links0.len() * 4 + 64);
        out.extend_from_slice(MAGIC);
        for x in [
            self.dim,
            self.m,
            self.ef_construction,
            self.ef_search,
            self.levels.len(),
            self.entry as usize,
            self.max_level,
        ] {
            out.extend_from_slice(&(x as u64).to_le_bytes());
        }
        self.vectors
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        out.extend_from_slice(&self.levels);
        self.len0
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        self.links0
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        for lists in &self.upper {
            for l in lists {
                out.extend_from_slice(&(l.len() as u32).to_le_bytes());
                l.iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
            }
        }
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take(MAGIC.len())? != MAGIC {
            return Err(IndexError::Invalid(
                "not a tandem HNSW file (bad magic)".into(),
            ));
        }
        let mut h = [0usize; 7];
        for x in &mut h {
            *x = r.u64()? as usize;
        }
        let [dim, m, ef_construction, ef_search, n, entry, max_level] = h;
        if dim == 0 || m < 2 || (n > 0 && entry >= n) || max_level > 15 {
            return Err(IndexError::Invalid("corrupt HNSW header".into()));
        }
        let m0 = 2 * m;
        let vectors = r.f32s(n * dim)?;
        let levels = r.take(n)?.to_vec();
        let len0: Vec<u16> = r
            .take(n * 2)?
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        let links0 = r.u32s(n * m0)?;
        let mut upper = Vec::with_capacity(n);
        for &level in &levels {
            let mut lists = Vec::with_capacity(level as usize);
            for _ in 0..level {
                let len = r.u32()? as usize;
                if len > m {
                    return Err(IndexError::Invalid("corrupt HNSW links".into()));
                }
                lists.push(r.u32s(len)?);
            }
            upper.push(lists);
        }
        if r.pos != bytes.len()
            || len0.iter().any(|&l| l as usize > m0)
            || links0.iter().any(|&l| l as usize >= n.max(1))
        {
            return Err(IndexError::Invalid("corrupt HNSW body".into()));
        }
        Ok(Hnsw {
            dim,
            m,
            m0,
            ef_construction,
            ef_search,
            vectors,
            levels,
            links0,
            len0,
            upper,
            entry: entry as u32,
            max_level,
        })
    }
}

const MAGIC: &[u8] = b"TANDEM-HNSW-1\0\0\0";

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| IndexError::Invalid("truncated HNSW file".into()))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u32s(&mut self, n: usize) -> Result<Vec<u32>> {
        Ok(self
            .take(n.saturating_mul(4))?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    fn f32s(&mut self, n: usize) -> Result<Vec<f32>> {
        Ok(self
            .take(n.saturating_mul(4))?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

impl AnnIndex for Hnsw {
    fn engine(&self) -> &'static str {
        "tandem-hnsw"
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.levels.len()
    }

    fn default_ef(&self) -> usize {
        self.ef_search
    }

    fn search(&self, q: &[f32], k: usize, ef: usize) -> Vec<(u32, f32)> {
        let n = self.levels.len();
        if n == 0 || k == 0 {
            return Vec::new();
        }
        let ef = ef.max(k);
        VISITED.with(|cell| {
            let mut visited = cell.borrow_mut();
            let mut ep = vec![Cand {
                d: self.dist(q, self.entry),
                id: self.entry,
            }];
            for layer in (1..=self.max_level).rev() {
                visited.reset(n);
                ep = self.search_layer(q, &ep, 1, layer, &mut visited);
                ep.truncate(1);
            }
            visited.reset(n);
            let found = self.search_layer(q, &ep, ef, 0, &mut visited);
            found.into_iter().take(k).map(|c| (c.id, -c.d)).collect()
        })
    }

    fn to_bytes(&self) -> Vec<u8> {
        Hnsw::to_bytes(self)
    }
}
