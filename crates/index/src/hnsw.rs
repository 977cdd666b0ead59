//! A hierarchical navigable small-world graph (Malkov & Yashunin, 2018) specialised for
//! L2-normalised vectors and inner-product similarity.
//!
//! Differences from a general-purpose HNSW, all for speed on 64-d normalised embeddings:
//! vectors are stored in one contiguous array; distance is `-<a, b>` (monotone in cosine distance
//! for unit vectors) computed with eight independent accumulators so it vectorises; layer-0 links
//! live in one flat array of `2·M` slots per node; `ef` is a per-query argument.

use std::borrow::Cow;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Mutex, RwLock};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::quant::Codes;
use crate::{AnnIndex, HnswParams, IndexError, Layout, Result};

/// Inner product with the fastest implementation this CPU supports.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    (crate::simd::select())(a, b)
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

/// Visited marks stamped with a generation, so a search clears the array only once every 255
/// searches. One byte per node keeps the marks of a 1M-node graph in 1 MB, mostly in cache.
struct Visited {
    marks: Vec<u8>,
    generation: u8,
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

/// Best-first search of one layer from `entry`, keeping the `ef` nearest found. Neighbour lists
/// are read through `neighbours(id, buf)`, so the same code runs on the finished lock-free layout
/// and on the per-node locks of a parallel build.
///
/// Rows for which `skip` holds still guide the walk (they are expanded like any other) but
/// never enter the results, so an exclusion list costs no recall and the answer keeps `ef`
/// rows whenever the graph reaches that many others.
///
/// A node's unvisited neighbours are collected first and `prefetch` is called for each, so
/// their rows are already on the way from memory while the first distances are computed.
fn search_layer(
    entry: &[Cand],
    ef: usize,
    visited: &mut Visited,
    dist: impl Fn(u32) -> f32,
    mut neighbours: impl FnMut(u32, &mut Vec<u32>),
    prefetch: impl Fn(u32),
    skip: impl Fn(u32) -> bool,
) -> Vec<Cand> {
    let mut candidates: BinaryHeap<Reverse<Cand>> = BinaryHeap::with_capacity(ef * 2);
    let mut results: BinaryHeap<Cand> = BinaryHeap::with_capacity(ef + 1);
    for &e in entry {
        if visited.insert(e.id) {
            candidates.push(Reverse(e));
            if !skip(e.id) {
                results.push(e);
            }
        }
    }
    let mut buf = Vec::with_capacity(64);
    let mut fresh = Vec::with_capacity(64);
    while let Some(Reverse(c)) = candidates.pop() {
        let worst = results.peek().map_or(f32::INFINITY, |r| r.d);
        if c.d > worst && results.len() >= ef {
            break;
        }
        buf.clear();
        neighbours(c.id, &mut buf);
        fresh.clear();
        for &nb in &buf {
            if visited.insert(nb) {
                prefetch(nb);
                fresh.push(nb);
            }
        }
        for &nb in &fresh {
            let d = dist(nb);
            if results.len() < ef || d < results.peek().map_or(f32::INFINITY, |r| r.d) {
                let cand = Cand { d, id: nb };
                candidates.push(Reverse(cand));
                if !skip(nb) {
                    results.push(cand);
                    if results.len() > ef {
                        results.pop();
                    }
                }
            }
        }
    }
    results.into_sorted_vec()
}

/// Starts loading every cache line of an `f32` row.
#[inline]
fn prefetch_f32(row: &[f32]) {
    for line in row.chunks(16) {
        crate::simd::prefetch(&line[0]);
    }
}

/// A node's neighbour lists while building.
struct Node {
    l0: Vec<u32>,
    up: Vec<Vec<u32>>,
}

/// The graph under construction, shared by the inserting threads.
struct Builder<'a> {
    dot: crate::simd::DotFn,
    dim: usize,
    m: usize,
    m0: usize,
    ef_construction: usize,
    vectors: &'a [f32],
    levels: &'a [u8],
    nodes: Vec<Mutex<Node>>,
    /// Set once a node's lists are complete on every layer. Reverse links make a node reachable
    /// from its neighbours while its lower layers are still empty; a concurrent insertion that
    /// descended into it would search layer 0 from a node with no neighbours and come out
    /// almost disconnected (seen as recall 0.79 on small indexes under load). Searches made while
    /// building therefore step only onto finished nodes.
    ready: Vec<AtomicBool>,
    /// (entry point, top level): read at the start of every insertion.
    top: RwLock<(u32, usize)>,
    /// Held for the whole insertion of a node that raises the top level.
    grow: Mutex<()>,
}

impl Builder<'_> {
    #[inline]
    fn vec(&self, id: u32) -> &[f32] {
        let s = id as usize * self.dim;
        &self.vectors[s..s + self.dim]
    }

    fn copy_neighbours(&self, id: u32, layer: usize, buf: &mut Vec<u32>) {
        let start = buf.len();
        {
            let node = self.nodes[id as usize].lock().expect("lock poisoned");
            if layer == 0 {
                buf.extend_from_slice(&node.l0);
            } else if let Some(l) = node.up.get(layer - 1) {
                buf.extend_from_slice(l);
            }
        }
        let mut keep = start;
        for i in start..buf.len() {
            if self.ready[buf[i] as usize].load(AtomicOrdering::Acquire) {
                buf[keep] = buf[i];
                keep += 1;
            }
        }
        buf.truncate(keep);
    }

    fn search(
        &self,
        q: &[f32],
        entry: &[Cand],
        ef: usize,
        layer: usize,
        visited: &mut Visited,
    ) -> Vec<Cand> {
        visited.reset(self.nodes.len());
        search_layer(
            entry,
            ef,
            visited,
            |id| -(self.dot)(q, self.vec(id)),
            |id, buf| self.copy_neighbours(id, layer, buf),
            |id| prefetch_f32(self.vec(id)),
            |_| false,
        )
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
            if kept.iter().all(|&s| -(self.dot)(cv, self.vec(s)) > c.d) {
                kept.push(c.id);
            }
        }
        kept
    }

    fn insert(&self, v: u32, visited: &mut Visited) {
        let level = self.levels[v as usize] as usize;
        // A node above the current top level serialises with other such nodes (rare: about
        // one in M per level). The read guard must be gone before `grow` is taken: a temporary
        // in the same statement would live until its end, and a thread holding `grow` while
        // waiting to write `top` would then wait for us forever (seen: a deadlocked build).
        let above_top = level > self.top.read().expect("lock poisoned").1;
        let _grow = above_top.then(|| self.grow.lock().expect("lock poisoned"));
        let (entry, max_level) = *self.top.read().expect("lock poisoned");
        let q = self.vec(v);
        let mut ep = vec![Cand {
            d: -(self.dot)(q, self.vec(entry)),
            id: entry,
        }];
        for layer in (level + 1..=max_level).rev() {
            ep = self.search(q, &ep, 1, layer, visited);
            ep.truncate(1);
        }
        for layer in (0..=level.min(max_level)).rev() {
            let found = self.search(q, &ep, self.ef_construction, layer, visited);
            let max_links = if layer == 0 { self.m0 } else { self.m };
            let chosen = self.select(&found, self.m);
            {
                let mut node = self.nodes[v as usize].lock().expect("lock poisoned");
                if layer == 0 {
                    node.l0 = chosen.clone();
                } else {
                    node.up[layer - 1] = chosen.clone();
                }
            }
            for &nb in &chosen {
                self.link(nb, v, layer, max_links);
            }
            ep = found;
        }
        self.ready[v as usize].store(true, AtomicOrdering::Release);
        if level > max_level {
            *self.top.write().expect("lock poisoned") = (v, level);
        }
    }

    /// Adds the reverse link `from → to`, re-selecting `from`'s neighbours when the list is full.
    fn link(&self, from: u32, to: u32, layer: usize, max_links: usize) {
        let mut node = self.nodes[from as usize].lock().expect("lock poisoned");
        let list = if layer == 0 {
            &mut node.l0
        } else {
            &mut node.up[layer - 1]
        };
        if list.contains(&to) {
            return;
        }
        if list.len() < max_links {
            list.push(to);
            return;
        }
        let base = self.vec(from);
        let mut cands: Vec<Cand> = list
            .iter()
            .chain(std::iter::once(&to))
            .map(|&id| Cand {
                d: -(self.dot)(base, self.vec(id)),
                id,
            })
            .collect();
        cands.sort_unstable();
        *list = self.select(&cands, max_links);
    }
}

pub struct Hnsw {
    /// Inner product chosen for this CPU once, kept here so the hot loop pays no lookup.
    dot: crate::simd::DotFn,
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
    /// Byte codes of the vectors: when present, layer 0 is walked on them and the best
    /// candidates re-ranked exactly (see [`crate::quant`]).
    codes: Option<Codes>,
}

impl Hnsw {
    /// Builds the graph over `vectors` (`n × dim`, row-major, expected L2-normalised).
    ///
    /// Points are inserted in parallel (rayon), as in hnswlib: each node's neighbour lists sit
    /// behind their own mutex while building, searches copy a list out under its lock, and a
    /// node that raises the top level takes a global lock for its whole insertion. The result
    /// is then flattened into lock-free arrays for serving. With one thread the build is
    /// deterministic for `params.seed`; with several, insertion interleaving varies.
    pub fn build(vectors: Vec<f32>, dim: usize, params: &HnswParams) -> Result<Self> {
        if dim == 0 || !vectors.len().is_multiple_of(dim) {
            return Err(IndexError::Invalid(format!(
                "{} values do not form vectors of dimension {dim}",
                vectors.len()
            )));
        }
        let n = vectors.len() / dim;
        let m = params.m.max(2);
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        let ml = 1.0 / (m as f64).ln();
        let levels: Vec<u8> = (0..n)
            .map(|_| {
                let r: f64 = rng.random::<f64>().max(1e-300);
                ((-r.ln() * ml).floor() as usize).min(15) as u8
            })
            .collect();
        let builder = Builder {
            dot: crate::simd::select(),
            dim,
            m,
            m0: 2 * m,
            ef_construction: params.ef_construction.max(m),
            vectors: &vectors,
            nodes: levels
                .iter()
                .map(|&l| {
                    Mutex::new(Node {
                        l0: Vec::with_capacity(2 * m),
                        up: vec![Vec::new(); l as usize],
                    })
                })
                .collect(),
            ready: (0..n).map(|v| AtomicBool::new(v == 0)).collect(),
            top: RwLock::new((0, levels.first().copied().unwrap_or(0) as usize)),
            grow: Mutex::new(()),
            levels: &levels,
        };
        {
            use rayon::prelude::*;
            (1..n as u32)
                .into_par_iter()
                .for_each_init(|| Visited::new(n), |visited, v| builder.insert(v, visited));
        }
        let (entry, max_level) = *builder.top.read().expect("lock poisoned");
        let m0 = builder.m0;
        let mut links0 = vec![0u32; n * m0];
        let mut len0 = vec![0u16; n];
        let mut upper = Vec::with_capacity(n);
        for (v, node) in builder.nodes.into_iter().enumerate() {
            let node = node.into_inner().expect("lock poisoned");
            links0[v * m0..v * m0 + node.l0.len()].copy_from_slice(&node.l0);
            len0[v] = node.l0.len() as u16;
            upper.push(node.up);
        }
        let mut h = Hnsw {
            dot: crate::simd::select(),
            dim,
            m,
            m0,
            ef_construction: params.ef_construction.max(m),
            ef_search: params.ef_search,
            vectors,
            levels,
            links0,
            len0,
            upper,
            entry,
            max_level,
            codes: None,
        };
        h.set_layout(params.layout);
        Ok(h)
    }

    /// Switches how layer 0 is walked: on `f32` vectors, or on byte codes with an exact
    /// re-rank (computed here from the vectors; the file format does not change). The code
    /// blocks carry the layer-0 lists, so with codes the separate row-ordered lists are
    /// dropped (and rebuilt from the blocks when needed).
    pub fn set_layout(&mut self, layout: Layout) {
        let (links0, len0) = match self.codes {
            Some(_) => self.lists_from_codes(),
            None => (
                std::mem::take(&mut self.links0),
                std::mem::take(&mut self.len0),
            ),
        };
        self.codes = match layout {
            Layout::F32 => None,
            Layout::Int8 => Some(Codes::new(
                &self.vectors,
                self.dim,
                &links0,
                &len0,
                self.m0,
                self.entry,
            )),
        };
        if self.codes.is_some() {
            self.links0 = Vec::new();
            self.len0 = Vec::new();
        } else {
            self.links0 = links0;
            self.len0 = len0;
        }
    }

    /// Layer-0 lists in row order (`n × m0` slots, counts): held, or read back from the code
    /// blocks.
    fn layer0_lists(&self) -> (Cow<'_, [u32]>, Cow<'_, [u16]>) {
        match self.codes {
            Some(_) => {
                let (links0, len0) = self.lists_from_codes();
                (Cow::Owned(links0), Cow::Owned(len0))
            }
            None => (Cow::Borrowed(&self.links0), Cow::Borrowed(&self.len0)),
        }
    }

    /// The layer-0 lists the code blocks hold, back in row order.
    fn lists_from_codes(&self) -> (Vec<u32>, Vec<u16>) {
        let Some(codes) = &self.codes else {
            return (Vec::new(), Vec::new());
        };
        let n = self.levels.len();
        let mut links0 = vec![0u32; n * self.m0];
        let mut len0 = vec![0u16; n];
        let mut buf = Vec::with_capacity(self.m0);
        for row in 0..n as u32 {
            buf.clear();
            codes.links(codes.internal(row), &mut buf);
            let s = row as usize * self.m0;
            for (i, &b) in buf.iter().enumerate() {
                links0[s + i] = codes.external(b);
            }
            len0[row as usize] = buf.len() as u16;
        }
        (links0, len0)
    }

    pub fn layout(&self) -> Layout {
        if self.codes.is_some() {
            Layout::Int8
        } else {
            Layout::F32
        }
    }

    /// Bytes of memory per vector while serving: vectors, codes, links and levels.
    pub fn bytes_per_vector(&self) -> f64 {
        let n = self.levels.len().max(1) as f64;
        let upper: usize = self
            .upper
            .iter()
            .map(|l| l.iter().map(|x| x.len() * 4 + 24).sum::<usize>() + 24)
            .sum();
        (self.dim * 4 + 1) as f64
            + match &self.codes {
                // The blocks hold the lists; the row↔block maps cost 8 bytes.
                Some(c) => (c.bytes_per_vector() + 8) as f64,
                None => (self.m0 * 4 + 2) as f64,
            }
            + upper as f64 / n
    }

    #[inline]
    fn vec(&self, id: u32) -> &[f32] {
        let s = id as usize * self.dim;
        &self.vectors[s..s + self.dim]
    }

    #[inline]
    fn dist(&self, q: &[f32], id: u32) -> f32 {
        -(self.dot)(q, self.vec(id))
    }

    fn neighbours(&self, id: u32, layer: usize) -> &[u32] {
        if layer == 0 {
            // Empty while the code blocks hold layer 0 (the walk then reads those).
            let Some(&len) = self.len0.get(id as usize) else {
                return &[];
            };
            let s = id as usize * self.m0;
            &self.links0[s..s + len as usize]
        } else {
            &self.upper[id as usize][layer - 1]
        }
    }

    fn search_layer(
        &self,
        q: &[f32],
        entry: &[Cand],
        ef: usize,
        layer: usize,
        visited: &mut Visited,
        skip: impl Fn(u32) -> bool,
    ) -> Vec<Cand> {
        search_layer(
            entry,
            ef,
            visited,
            |id| -(self.dot)(q, self.vec(id)),
            |id, buf| buf.extend_from_slice(self.neighbours(id, layer)),
            |id| prefetch_f32(self.vec(id)),
            skip,
        )
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let (links0, len0) = self.layer0_lists();
        let mut out = Vec::with_capacity(self.vectors.len() * 4 + links0.len() * 4 + 64);
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
        len0.iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        links0
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
        let bad = |field: &str, value: usize, want: &str| {
            Err(IndexError::Invalid(format!(
                "corrupt HNSW header: {field} = {value} ({want})"
            )))
        };
        if dim == 0 || dim > MAX_DIM {
            return bad("dim", dim, &format!("expected 1..={MAX_DIM}"));
        }
        if !(2..=MAX_M).contains(&m) {
            return bad("m", m, &format!("expected 2..={MAX_M}"));
        }
        if ef_search == 0 || ef_search > MAX_EF {
            return bad("ef_search", ef_search, &format!("expected 1..={MAX_EF}"));
        }
        if ef_construction > MAX_EF {
            return bad(
                "ef_construction",
                ef_construction,
                &format!("at most {MAX_EF}"),
            );
        }
        // Every node costs at least its vector: a count the file cannot hold is corrupt (and
        // must not size an allocation).
        if n.saturating_mul(dim).saturating_mul(4) > bytes.len() {
            return bad("n", n, "more vectors than the file holds");
        }
        if n > 0 && entry >= n {
            return bad("entry", entry, &format!("expected < n = {n}"));
        }
        if max_level > MAX_LEVEL {
            return bad("max_level", max_level, &format!("at most {MAX_LEVEL}"));
        }
        let m0 = 2 * m;
        let vectors = r.f32s(n * dim)?;
        if let Some(i) = vectors.iter().position(|x| !x.is_finite()) {
            return Err(IndexError::Invalid(format!(
                "corrupt HNSW body: vector {} holds a non-finite value",
                i / dim
            )));
        }
        let levels = r.take(n)?.to_vec();
        if let Some((v, &l)) = levels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize > max_level)
        {
            return Err(IndexError::Invalid(format!(
                "corrupt HNSW body: node {v} has level {l} above max_level {max_level}"
            )));
        }
        if n > 0 && levels[entry] as usize != max_level {
            return Err(IndexError::Invalid(format!(
                "corrupt HNSW header: max_level {max_level} but the entry point's level is {}",
                levels[entry]
            )));
        }
        let len0: Vec<u16> = r
            .take(n * 2)?
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        let links0 = r.u32s(n * m0)?;
        let mut upper = Vec::with_capacity(n);
        for (v, &level) in levels.iter().enumerate() {
            let mut lists = Vec::with_capacity(level as usize);
            for layer in 1..=level {
                let len = r.u32()? as usize;
                if len > m {
                    return Err(IndexError::Invalid(format!(
                        "corrupt HNSW links: node {v} has {len} neighbours on layer {layer} (at most m = {m})"
                    )));
                }
                let list = r.u32s(len)?;
                if let Some(&bad) = list.iter().find(|&&u| u as usize >= n) {
                    return Err(IndexError::Invalid(format!(
                        "corrupt HNSW links: node {v} links to node {bad} on layer {layer} (n = {n})"
                    )));
                }
                lists.push(list);
            }
            upper.push(lists);
        }
        if r.pos != bytes.len() {
            return Err(IndexError::Invalid(format!(
                "corrupt HNSW body: {} trailing bytes",
                bytes.len() - r.pos
            )));
        }
        if let Some(v) = len0.iter().position(|&l| l as usize > m0) {
            return Err(IndexError::Invalid(format!(
                "corrupt HNSW links: node {v} has {} layer-0 neighbours (at most {m0})",
                len0[v]
            )));
        }
        if let Some(i) = links0.iter().position(|&l| l as usize >= n.max(1)) {
            return Err(IndexError::Invalid(format!(
                "corrupt HNSW links: node {} links to node {} on layer 0 (n = {n})",
                i / m0,
                links0[i]
            )));
        }
        Ok(Hnsw {
            dot: crate::simd::select(),
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
            codes: None,
        })
    }
}

const MAGIC: &[u8] = b"TANDEM-HNSW-1\0\0\0";

/// Bounds a loaded header must respect (anything beyond is corrupt, and must not size an
/// allocation or a loop).
pub const MAX_DIM: usize = 65_536;
pub const MAX_M: usize = 256;
pub const MAX_EF: usize = 1 << 16;
pub const MAX_LEVEL: usize = 15;

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

    fn bytes_per_vector(&self) -> f64 {
        Hnsw::bytes_per_vector(self)
    }

    fn search(&self, q: &[f32], k: usize, ef: usize) -> Vec<(u32, f32)> {
        self.search_filtered(q, k, ef, &|_| false)
    }

    fn search_filtered(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        skip: &dyn Fn(u32) -> bool,
    ) -> Vec<(u32, f32)> {
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
                ep = self.search_layer(q, &ep, 1, layer, &mut visited, |_| false);
                ep.truncate(1);
            }
            visited.reset(n);
            let Some(codes) = &self.codes else {
                let found = self.search_layer(q, &ep, ef, 0, &mut visited, skip);
                return found.into_iter().take(k).map(|c| (c.id, -c.d)).collect();
            };
            // Layer 0 on codes: the walk ranks by code scores, then the `ef` candidates it
            // kept are re-scored exactly and the best k of those returned.
            // Layer 0 runs on block numbers (see `quant`); rows again from here on.
            let cq = codes.prepare(q);
            for e in &mut ep {
                e.id = codes.internal(e.id);
                e.d = -codes.score(&cq, e.id);
            }
            let found = search_layer(
                &ep,
                ef,
                &mut visited,
                |id| -codes.score(&cq, id),
                |id, buf| codes.links(id, buf),
                |id| codes.prefetch(id),
                |id| skip(codes.external(id)),
            );
            let rows: Vec<u32> = found.iter().map(|c| codes.external(c.id)).collect();
            for &r in &rows {
                prefetch_f32(self.vec(r));
            }
            let mut exact: Vec<(u32, f32)> = rows
                .iter()
                .map(|&r| (r, (self.dot)(q, self.vec(r))))
                .collect();
            exact.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            exact.truncate(k);
            exact
        })
    }

    fn to_bytes(&self) -> Vec<u8> {
        Hnsw::to_bytes(self)
    }
}
