//! A hierarchical navigable small-world graph (Malkov & Yashunin, 2018) specialised for
//! L2-normalised vectors and inner-product similarity.
//!
//! Differences from a general-purpose HNSW, all for speed on 64-d normalised embeddings:
//! vectors are stored in one contiguous array; distance is `-<a, b>` (monotone in cosine distance
//! for unit vectors) computed with eight independent accumulators so it vectorises; layer-0 links
//! live in one flat array of `2·M` slots per node; `ef` is a per-query argument.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, RwLock};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::quant::{block_shape, Codes};
use crate::store::{align_up, Slab, Store};
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

/// What one search needs besides the index, kept per thread so a search allocates nothing
/// but its answer.
struct Scratch {
    visited: Visited,
    pool: Vec<Slot>,
    buf: Vec<u32>,
    fresh: Vec<u32>,
    scores: Vec<f32>,
    query: crate::quant::CodeQuery,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch {
        visited: Visited::new(0),
        pool: Vec::new(),
        buf: Vec::new(),
        fresh: Vec::new(),
        scores: Vec::new(),
        query: Default::default(),
    });
}

/// Best-first search of one layer from `entry` while building, keeping the `ef` nearest found
/// (neighbour lists copied out of the per-node locks through `neighbours(id, buf)`).
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
) -> Vec<Cand> {
    let mut candidates: BinaryHeap<Reverse<Cand>> = BinaryHeap::with_capacity(ef * 2);
    let mut results: BinaryHeap<Cand> = BinaryHeap::with_capacity(ef + 1);
    for &e in entry {
        if visited.insert(e.id) {
            candidates.push(Reverse(e));
            results.push(e);
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
                results.push(cand);
                if results.len() > ef {
                    results.pop();
                }
            }
        }
    }
    results.into_sorted_vec()
}

/// One node in [`search_pool`]'s pool.
#[derive(Clone, Copy)]
struct Slot {
    d: f32,
    id: u32,
    expanded: bool,
    skipped: bool,
}

/// Best-first search of layer 0 for serving, with one sorted array instead of a candidate
/// heap and a result heap: the pool holds the best nodes found, nearest first, and the walk
/// always expands the nearest one not yet expanded; it ends when every pooled node has been.
/// Nodes past the `keep`-th kept one are dropped (a heap walk would never expand them either).
/// An insertion moves at most `keep` slots of 12 bytes. `keep` ≥ `ef`; when it is larger
/// (an answer of more rows than the walk's breadth), the walk ends once the `ef` nearest kept
/// nodes are expanded, and the pool holds the `keep` best of every node scored.
///
/// Nodes for which `skip` holds still guide the walk (they are pooled and expanded like any
/// other) but are not counted among those kept and never answered, so an exclusion list
/// costs no recall and the answer keeps `keep` nodes whenever the graph reaches that many
/// others. `prefetch` is called for a node's unvisited neighbours before any is scored, then
/// `dist` scores them all in one call (distances: smaller is nearer; one call per expanded
/// node lets the kernel run its loop without a call per row), and `pooled` is called for a
/// node entering the pool (its list will likely be read).
#[allow(clippy::too_many_arguments)]
fn search_pool(
    entry: Cand,
    ef: usize,
    keep: usize,
    scratch: &mut Scratch,
    dist: impl Fn(&[u32], &mut [f32]),
    mut neighbours: impl FnMut(u32, &mut Vec<u32>),
    prefetch: impl Fn(u32),
    pooled: impl Fn(u32),
    skip: impl Fn(u32) -> bool,
) {
    let Scratch {
        visited,
        pool,
        buf,
        fresh,
        scores,
        ..
    } = scratch;
    pool.clear();
    let mut kept = 0;
    visited.insert(entry.id);
    pool_insert(pool, &mut kept, keep, entry, &pooled, &skip);
    let mut cursor = 0;
    while cursor < pool.len() {
        // A beam narrower than the answer: nodes ranked past the `ef`-th kept one stay in the
        // answer but are not expanded (ranks only grow, so the walk is the `ef` walk's).
        if ef < keep && pool[..cursor].iter().filter(|s| !s.skipped).count() >= ef {
            break;
        }
        pool[cursor].expanded = true;
        let id = pool[cursor].id;
        buf.clear();
        neighbours(id, buf);
        fresh.clear();
        for &nb in buf.iter() {
            if visited.insert(nb) {
                prefetch(nb);
                fresh.push(nb);
            }
        }
        let mut next = cursor + 1;
        scores.resize(fresh.len(), 0.0);
        dist(fresh, scores);
        for (&nb, &d) in fresh.iter().zip(scores.iter()) {
            // Most scored nodes are worse than a full pool's worst: refused here, inline.
            if kept >= keep && pool.last().is_some_and(|w| d >= w.d) {
                continue;
            }
            let at = pool_insert(pool, &mut kept, keep, Cand { d, id: nb }, &pooled, &skip);
            next = next.min(at);
        }
        cursor = next;
        while cursor < pool.len() && pool[cursor].expanded {
            cursor += 1;
        }
    }
    pool.retain(|s| !s.skipped);
}

/// Puts `c` in its place in the pool and returns where; past `ef` kept nodes, drops the worst
/// kept one and every (skipped) node behind it.
fn pool_insert(
    pool: &mut Vec<Slot>,
    kept: &mut usize,
    ef: usize,
    c: Cand,
    pooled: &impl Fn(u32),
    skip: &impl Fn(u32) -> bool,
) -> usize {
    let at = pool.partition_point(|s| s.d <= c.d);
    pooled(c.id);
    let skipped = skip(c.id);
    pool.insert(
        at,
        Slot {
            d: c.d,
            id: c.id,
            expanded: false,
            skipped,
        },
    );
    if !skipped {
        *kept += 1;
        if *kept > ef {
            let last = pool.iter().rposition(|s| !s.skipped).expect("kept > 0");
            pool.truncate(last);
            *kept -= 1;
        }
    }
    at
}

/// Starts loading every cache line of an `f32` row.
#[inline]
fn prefetch_f32(row: &[f32]) {
    for line in row.chunks(16) {
        crate::simd::prefetch(&line[0]);
    }
}

/// A node's upper-layer neighbour lists while building (its layer-0 list is in
/// [`Builder::l0`]); the mutex around it also serialises writes to its layer-0 list.
struct Node {
    up: Vec<Vec<u32>>,
}

/// Marks the end of a layer-0 list shorter than `m0` in [`Builder::l0`].
const NO_LINK: u32 = u32::MAX;

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
    /// Layer 0, flat: node `v`'s list is slots `v·m0 .. (v+1)·m0`, ended by [`NO_LINK`] when
    /// shorter. A search reads a list here without taking the node's lock — one memory fetch
    /// where a list behind its own lock and heap buffer took two or three dependent ones (the
    /// copy of lists was 14 % of a build's time, almost all waiting on memory). Writers hold the
    /// node's mutex and store the ids, then the end mark; a reader racing a rewrite can see new
    /// ids followed by old ones, every one a node of this graph, which a search tolerates as it
    /// tolerates a list that changes right after it was read.
    ///
    /// With `fill`, the slots after a list's end mark hold its *fill*: the nearest candidates
    /// the selection heuristic set aside, ended by a second mark when shorter. Searches while
    /// building stop at the first mark, so the fill costs the build nothing; the index serves
    /// list and fill together (see [`HnswParams::fill`]).
    l0: Vec<AtomicU32>,
    fill: bool,
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

    /// Node `id`'s layer-0 list.
    fn l0(&self, id: u32) -> &[AtomicU32] {
        let s = id as usize * self.m0;
        &self.l0[s..s + self.m0]
    }

    /// Appends node `id`'s layer-0 list to `out` (lock-free: see [`Builder::l0`]).
    fn read_l0(&self, id: u32, out: &mut Vec<u32>) {
        for slot in self.l0(id) {
            let nb = slot.load(AtomicOrdering::Relaxed);
            if nb == NO_LINK {
                break;
            }
            out.push(nb);
        }
    }

    /// Appends node `id`'s fill (the slots after its list's end mark) to `out`.
    fn read_fill(&self, id: u32, out: &mut Vec<u32>) {
        let slots = self.l0(id);
        let Some(end) = slots
            .iter()
            .position(|s| s.load(AtomicOrdering::Relaxed) == NO_LINK)
        else {
            return;
        };
        for slot in &slots[end + 1..] {
            let nb = slot.load(AtomicOrdering::Relaxed);
            if nb == NO_LINK {
                break;
            }
            out.push(nb);
        }
    }

    /// Replaces node `id`'s layer-0 list and fill; the caller holds the node's mutex.
    fn write_l0(&self, id: u32, list: &[u32], fill: &[u32]) {
        debug_assert!(
            list.len() <= self.m0 && fill.len() <= self.fill_room(list.len()),
            "a layer-0 list and its fill hold at most m0 slots"
        );
        let slots = self.l0(id);
        for (slot, &nb) in slots.iter().zip(list) {
            slot.store(nb, AtomicOrdering::Relaxed);
        }
        if let Some(end) = slots.get(list.len()) {
            end.store(NO_LINK, AtomicOrdering::Relaxed);
        }
        let rest = slots.get(list.len() + 1..).unwrap_or(&[]);
        for (slot, &nb) in rest.iter().zip(fill) {
            slot.store(nb, AtomicOrdering::Relaxed);
        }
        if let Some(end) = rest.get(fill.len()) {
            end.store(NO_LINK, AtomicOrdering::Relaxed);
        }
    }

    /// How many fill slots a list of `len` links leaves: those after it and its end mark.
    fn fill_room(&self, len: usize) -> usize {
        self.m0.saturating_sub(len + 1)
    }

    /// The fill beside a list `kept` selected from `sorted` (nearest first): the nearest
    /// candidates not kept, as many as fit in the `m0` slots after `kept` and its end mark.
    fn fill_from(&self, sorted: &[Cand], kept: &[u32]) -> Vec<u32> {
        if !self.fill {
            return Vec::new();
        }
        sorted
            .iter()
            .filter(|c| !kept.contains(&c.id))
            .take(self.fill_room(kept.len()))
            .map(|c| c.id)
            .collect()
    }

    fn copy_neighbours(&self, id: u32, layer: usize, buf: &mut Vec<u32>) {
        let start = buf.len();
        if layer == 0 {
            self.read_l0(id, buf);
        } else {
            let node = self.nodes[id as usize].lock().expect("lock poisoned");
            if let Some(l) = node.up.get(layer - 1) {
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
                    self.write_l0(v, &chosen, &self.fill_from(&found, &chosen));
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
    /// On layer 0 the candidates are the list, its fill and `to`; a link found in the fill moves
    /// into the list, and the fill shrinks to the slots left.
    fn link(&self, from: u32, to: u32, layer: usize, max_links: usize) {
        let mut node = self.nodes[from as usize].lock().expect("lock poisoned");
        if layer == 0 {
            let (mut list, mut fill) = (Vec::with_capacity(self.m0), Vec::new());
            self.read_l0(from, &mut list);
            self.read_fill(from, &mut fill);
            if list.contains(&to) {
                return;
            }
            fill.retain(|&f| f != to);
            if list.len() < max_links {
                list.push(to);
                fill.truncate(self.fill_room(list.len()));
            } else {
                let cands = self.ranked(from, list.iter().chain(&fill).chain([&to]));
                list = self.select(&cands, max_links);
                fill = self.fill_from(&cands, &list);
            }
            self.write_l0(from, &list, &fill);
        } else {
            self.relink(from, to, &mut node.up[layer - 1], max_links);
        }
    }

    /// Adds `to` to `from`'s upper-layer `list`, re-selecting when it is full (layer 0, with
    /// its fill, is [`Builder::link`]'s own).
    fn relink(&self, from: u32, to: u32, list: &mut Vec<u32>, max_links: usize) {
        if list.contains(&to) {
            return;
        }
        if list.len() < max_links {
            list.push(to);
            return;
        }
        let cands = self.ranked(from, list.iter().chain([&to]));
        *list = self.select(&cands, max_links);
    }

    /// `ids` as candidates for `from`'s list, nearest first.
    fn ranked<'i>(&self, from: u32, ids: impl Iterator<Item = &'i u32>) -> Vec<Cand> {
        let base = self.vec(from);
        let mut cands: Vec<Cand> = ids
            .map(|&id| Cand {
                d: -(self.dot)(base, self.vec(id)),
                id,
            })
            .collect();
        cands.sort_unstable();
        cands
    }
}

pub struct Hnsw {
    /// Inner products chosen for this CPU once (one row, many rows), kept here so the hot loop
    /// pays no lookup.
    dot: crate::simd::DotFn,
    dot_rows: crate::simd::DotRowsFn,
    dim: usize,
    m: usize,
    m0: usize,
    ef_construction: usize,
    ef_search: usize,
    /// Everything is in block order (breadth-first from the entry, see [`crate::quant`]) and
    /// links block numbers: vector `b` is row `codes.external(b)`'s.
    vectors: Slab<f32>,
    levels: Slab<u8>,
    /// Upper layers, flat: node `v`'s lists for layers 1..=level start at `upper[upper_off[v]]`,
    /// each as its length followed by its ids.
    upper_off: Slab<u64>,
    upper: Slab<u32>,
    entry: u32,
    max_level: usize,
    /// Layer 0: per node (in breadth-first block order) its byte code and its neighbour list
    /// (see [`crate::quant`]).
    codes: Codes,
    /// What layer 0 is scored on: codes (then the best candidates re-ranked exactly) or the
    /// vectors themselves. Never `Auto` here.
    layout: Layout,
}

/// A row of a row-major `n × dim` array.
#[inline]
fn row(vectors: &[f32], dim: usize, id: u32) -> &[f32] {
    let s = id as usize * dim;
    &vectors[s..s + dim]
}

/// Appends a node's upper-layer run (`[len, ids…]` per layer) to `out` with every id passed
/// through `map`.
fn renumber_run(run: &[u32], map: impl Fn(u32) -> u32, out: &mut Vec<u32>) {
    let mut p = 0;
    while p < run.len() {
        let len = run[p] as usize;
        out.push(run[p]);
        out.extend(run[p + 1..p + 1 + len].iter().map(|&u| map(u)));
        p += 1 + len;
    }
}

/// Nested per-node upper-layer lists, flattened into offsets and `[len, ids…]` runs.
fn flatten_upper(nested: Vec<Vec<Vec<u32>>>) -> (Vec<u64>, Vec<u32>) {
    let mut off = Vec::with_capacity(nested.len() + 1);
    let mut ids = Vec::new();
    off.push(0);
    for lists in nested {
        for l in lists {
            ids.push(l.len() as u32);
            ids.extend_from_slice(&l);
        }
        off.push(ids.len() as u64);
    }
    (off, ids)
}

impl Hnsw {
    /// Builds the graph over `vectors` (`n × dim`, row-major, expected L2-normalised).
    ///
    /// Points are inserted in parallel (rayon), as in hnswlib: each node's lists are written
    /// under its own mutex, searches read layer-0 lists from one flat array without it (see
    /// [`Builder::l0`]) and upper-layer lists under it, and a node that raises the top level
    /// takes a global lock for its whole insertion. The result is then flattened into lock-free
    /// arrays for serving. With one thread the build is deterministic for `params.seed`; with
    /// several, insertion interleaving varies.
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
                        up: vec![Vec::new(); l as usize],
                    })
                })
                .collect(),
            l0: (0..n * 2 * m).map(|_| AtomicU32::new(NO_LINK)).collect(),
            fill: params.fill,
            ready: (0..n).map(|v| AtomicBool::new(v == 0)).collect(),
            top: RwLock::new((0, levels.first().copied().unwrap_or(0) as usize)),
            grow: Mutex::new(()),
            levels: &levels,
        };
        (1..n as u32)
            .into_par_iter()
            .for_each_init(|| Visited::new(n), |visited, v| builder.insert(v, visited));
        let (entry, max_level) = *builder.top.read().expect("lock poisoned");
        let m0 = builder.m0;
        let mut links0 = vec![0u32; n * m0];
        let mut len0 = vec![0u16; n];
        let mut upper = Vec::with_capacity(n);
        let mut list = Vec::with_capacity(m0);
        for v in 0..n {
            list.clear();
            builder.read_l0(v as u32, &mut list);
            // Served as one list: the heuristic's diverse links first, then the fill.
            builder.read_fill(v as u32, &mut list);
            links0[v * m0..v * m0 + list.len()].copy_from_slice(&list);
            len0[v] = list.len() as u16;
        }
        for node in builder.nodes {
            upper.push(node.into_inner().expect("lock poisoned").up);
        }
        let (upper_off, upper) = flatten_upper(upper);
        Ok(Self::assemble(
            Header {
                dim,
                m,
                ef_construction: params.ef_construction.max(m),
                ef_search: params.ef_search,
                entry,
                max_level,
            },
            &vectors,
            levels,
            (&links0, &len0),
            (upper_off, upper),
            params.layout,
        ))
    }

    /// An index from row-ordered parts (a build, or a first-format file): layer 0 laid out in
    /// code blocks, the vectors put in block order, `layout` resolved.
    fn assemble(
        h: Header,
        vectors: &[f32],
        levels: Vec<u8>,
        (links0, len0): (&[u32], &[u16]),
        (upper_off, upper): (Vec<u64>, Vec<u32>),
        layout: Layout,
    ) -> Self {
        let m0 = 2 * h.m;
        let codes = Codes::new(vectors, h.dim, links0, len0, m0, h.entry);
        let view = codes.view();
        let n = levels.len();
        // Everything in block order, linking block numbers: a search maps nothing until it
        // answers.
        let mut blocked = Vec::with_capacity(vectors.len());
        let mut levels_b = Vec::with_capacity(n);
        let (mut off_b, mut upper_b) = (Vec::with_capacity(n + 1), Vec::with_capacity(upper.len()));
        off_b.push(0u64);
        for b in 0..n as u32 {
            let r = view.external(b) as usize;
            blocked.extend_from_slice(row(vectors, h.dim, r as u32));
            levels_b.push(levels[r]);
            let run = &upper[upper_off[r] as usize..upper_off[r + 1] as usize];
            renumber_run(run, |u| view.internal(u), &mut upper_b);
            off_b.push(upper_b.len() as u64);
        }
        // An empty index has no entry to translate.
        let entry = if n == 0 { 0 } else { view.internal(h.entry) };
        let mut index = Hnsw {
            dot: crate::simd::select(),
            dot_rows: crate::simd::select_rows(),
            dim: h.dim,
            m: h.m,
            m0,
            ef_construction: h.ef_construction,
            ef_search: h.ef_search,
            vectors: blocked.into(),
            levels: levels_b.into(),
            upper_off: off_b.into(),
            upper: upper_b.into(),
            entry,
            max_level: h.max_level,
            codes,
            layout: Layout::Int8,
        };
        index.set_layout(layout);
        index
    }

    /// Chooses what layer 0 is scored on. Both layouts walk the same blocks; `Auto` measures
    /// how faithfully the codes rank this index's own vectors ([`Hnsw::code_fidelity`]) and
    /// takes the codes when they find at least [`AUTO_FIDELITY`] of the exact top 10 among
    /// their own top 10, the vectors otherwise.
    pub fn set_layout(&mut self, layout: Layout) {
        self.layout = match layout {
            Layout::Auto if self.code_fidelity() >= AUTO_FIDELITY => Layout::Int8,
            Layout::Auto => Layout::F32,
            l => l,
        };
    }

    /// The share of the exact 10 nearest neighbours that the codes place among their own 10
    /// nearest, for up to 200 of the index's own vectors as queries against up to 20,000 of
    /// them (the query itself left out): what the code walk at small `ef` keeps, since only
    /// its `ef` candidates are re-ranked exactly. Synthetic embeddings score 0.98; a trained
    /// model's item embeddings (cosine 0.99 to their mean, neighbours 4·10⁻⁴ apart in score)
    /// 0.66–0.68, and there the `f32` walk needed a third of the code walk's `ef` for
    /// the same recall. (Measured among the codes' 20 nearest instead, as before, the trained
    /// set scored 0.88 and a rotation of the codes to principal axes lifted it past 0.97
    /// while the code walk still lost to `f32`: the top 20 hid what the walk pays for.)
    pub fn code_fidelity(&self) -> f64 {
        let n = self.levels.len();
        if n < 2 {
            return 1.0;
        }
        let pick = |count: usize| -> Vec<u32> {
            let count = count.min(n);
            (0..count).map(|i| (i * n / count) as u32).collect()
        };
        let (base, queries) = (pick(20_000), pick(200));
        let view = self.codes.view();
        let mut cq = crate::quant::CodeQuery::default();
        let mut found = 0usize;
        let mut wanted = 0usize;
        let mut exact: Vec<(f32, u32)> = Vec::with_capacity(base.len());
        let mut coded: Vec<(f32, u32)> = Vec::with_capacity(base.len());
        for &qb in &queries {
            let q = row(&self.vectors, self.dim, qb);
            view.prepare_into(q, &mut cq);
            exact.clear();
            coded.clear();
            for &b in base.iter().filter(|&&b| b != qb) {
                exact.push((-(self.dot)(q, row(&self.vectors, self.dim, b)), b));
                coded.push((-view.score(&cq, b), b));
            }
            let top = |v: &mut Vec<(f32, u32)>, k: usize| -> Vec<u32> {
                let k = k.min(v.len());
                if k > 0 && k < v.len() {
                    v.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0));
                }
                v[..k].iter().map(|x| x.1).collect()
            };
            let truth = top(&mut exact, 10);
            let near = top(&mut coded, 10);
            wanted += truth.len();
            found += truth.iter().filter(|t| near.contains(t)).count();
        }
        if wanted == 0 {
            1.0
        } else {
            found as f64 / wanted as f64
        }
    }

    /// The layer-0 lists the code blocks hold, back in row order (for writing old files).
    #[cfg(test)]
    fn lists_from_codes(&self) -> (Vec<u32>, Vec<u16>) {
        let n = self.levels.len();
        let view = self.codes.view();
        let mut links0 = vec![0u32; n * self.m0];
        let mut len0 = vec![0u16; n];
        let mut buf = Vec::with_capacity(self.m0);
        for r in 0..n as u32 {
            buf.clear();
            view.links(view.internal(r), &mut buf);
            let s = r as usize * self.m0;
            for (i, &b) in buf.iter().enumerate() {
                links0[s + i] = view.external(b);
            }
            len0[r as usize] = buf.len() as u16;
        }
        (links0, len0)
    }

    /// What layer 0 is scored on (`F32` or `Int8`, never `Auto`).
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Whether the index's arrays are a memory-mapped file (rather than heap memory).
    pub fn is_mapped(&self) -> bool {
        matches!(&self.vectors, Slab::View { store, .. } if store.is_mapped())
    }

    /// Bytes of memory per vector while serving: vectors, blocks (codes and layer-0 lists),
    /// the row↔block maps, levels and upper layers.
    pub fn bytes_per_vector(&self) -> f64 {
        let n = self.levels.len().max(1) as f64;
        let upper = (self.upper_off.len() * 8 + self.upper.len() * 4) as f64 / n;
        (self.dim * 4 + 1 + self.codes.bytes_per_vector() + 8) as f64 + upper
    }

    #[inline]
    fn dist(&self, q: &[f32], id: u32) -> f32 {
        -(self.dot)(q, row(&self.vectors, self.dim, id))
    }

    /// Node `id`'s neighbours on upper layer `layer` (≥ 1); empty if it is not on that layer.
    /// (The runs were checked when the index was built or loaded.)
    fn upper_neighbours(&self, id: u32, layer: usize) -> &[u32] {
        let level = self.levels.get(id as usize).copied().unwrap_or(0) as usize;
        if layer == 0 || layer > level {
            return &[];
        }
        let ids: &[u32] = &self.upper;
        let mut p = self.upper_off[id as usize] as usize;
        for _ in 1..layer {
            p += 1 + ids[p] as usize;
        }
        let len = ids[p] as usize;
        &ids[p + 1..p + 1 + len]
    }

    /// Greedy descent on upper layer `layer`: move to the nearest neighbour while one is nearer
    /// than where the walk stands (what a best-first search with `ef` = 1 does, without its
    /// heaps and visited marks). A step starts loading every neighbour's row before scoring
    /// them in one call: upper-layer nodes are scattered over the whole array, so each row is
    /// likely a cache miss, and this way the misses of one step overlap.
    fn greedy_upper(&self, q: &[f32], mut at: Cand, layer: usize, scores: &mut Vec<f32>) -> Cand {
        loop {
            let list = self.upper_neighbours(at.id, layer);
            for &nb in list {
                prefetch_f32(row(&self.vectors, self.dim, nb));
            }
            scores.resize(list.len(), 0.0);
            (self.dot_rows)(q, &self.vectors, self.dim, list, scores);
            let mut moved = false;
            for (&nb, &s) in list.iter().zip(scores.iter()) {
                if -s < at.d {
                    at = Cand { d: -s, id: nb };
                    moved = true;
                }
            }
            if !moved {
                return at;
            }
        }
    }

    /// The index as a file: a fixed header, then its arrays as aligned little-endian sections
    /// (see [`Sections`]), layer 0 as code blocks. [`Hnsw::open`] maps such a file and serves
    /// from it without copying.
    pub fn to_bytes(&self) -> Vec<u8> {
        let codes = &self.codes;
        let n = self.levels.len();
        let (_, block) = block_shape(self.dim, self.m0);
        let sec = Sections::new(n, self.dim, self.upper.len(), block)
            .expect("an index in memory has a size that fits in memory");
        let mut out = vec![0u8; sec.end];
        out[..MAGIC2.len()].copy_from_slice(MAGIC2);
        for (i, x) in [
            self.dim,
            self.m,
            self.ef_construction,
            self.ef_search,
            n,
            self.entry as usize,
            self.max_level,
            self.upper.len(),
            match self.layout {
                Layout::F32 => 0,
                _ => 1,
            },
        ]
        .into_iter()
        .enumerate()
        {
            let at = MAGIC2.len() + i * 8;
            out[at..at + 8].copy_from_slice(&(x as u64).to_le_bytes());
        }
        let (ext, int, lo, step) = codes.maps();
        let mut put = |at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
        put(sec.vectors, bytemuck::cast_slice(&self.vectors));
        put(sec.lo, bytemuck::cast_slice(lo));
        put(sec.step, bytemuck::cast_slice(step));
        put(sec.levels, &self.levels);
        put(sec.ext, bytemuck::cast_slice(ext));
        put(sec.int, bytemuck::cast_slice(int));
        put(sec.upper_off, bytemuck::cast_slice(&self.upper_off));
        put(sec.upper, bytemuck::cast_slice(&self.upper));
        put(sec.blocks, codes.blocks());
        out
    }

    /// Reads an index file from memory (copied into aligned memory of its own). Files of the
    /// first format (row-ordered lists, no codes) are still read.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.starts_with(MAGIC1) {
            return Self::from_bytes_v1(bytes);
        }
        Self::from_store(Arc::new(Store::copy_of(bytes)))
    }

    /// Memory-maps the index file at `path` and serves from the mapping: nothing is copied,
    /// the header and every link are checked (a corrupt or truncated file is refused, never
    /// followed out of bounds). A first-format file is read into memory instead.
    pub fn open(path: &Path) -> Result<Self> {
        let store = Arc::new(Store::map(path)?);
        if store.bytes().starts_with(MAGIC1) {
            return Self::from_bytes_v1(store.bytes());
        }
        Self::from_store(store)
    }

    fn from_store(store: Arc<Store>) -> Result<Self> {
        let bytes = store.bytes();
        if bytes.len() < HEADER2 || &bytes[..MAGIC2.len()] != MAGIC2 {
            return Err(IndexError::Invalid(if bytes.len() < HEADER2 {
                "truncated HNSW file (header)".into()
            } else {
                "not a tandem HNSW file (bad magic)".into()
            }));
        }
        let field = |i: usize| {
            let at = MAGIC2.len() + i * 8;
            u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")) as usize
        };
        let [dim, m, ef_construction, ef_search, n, entry, max_level, upper_len, layout] =
            std::array::from_fn(field);
        let layout = match layout {
            0 => Layout::F32,
            1 => Layout::Int8,
            l => {
                return Err(IndexError::Invalid(format!(
                    "corrupt HNSW header: layout = {l} (expected 0 or 1)"
                )))
            }
        };
        check_header(
            [dim, m, ef_construction, ef_search, n, entry, max_level],
            bytes.len(),
        )?;
        let m0 = 2 * m;
        let (_, block) = block_shape(dim, m0);
        let sec = Sections::new(n, dim, upper_len, block)
            .filter(|s| s.end <= bytes.len())
            .ok_or_else(|| IndexError::Invalid("truncated HNSW file".into()))?;
        if sec.end != bytes.len() {
            return Err(IndexError::Invalid(format!(
                "corrupt HNSW body: {} trailing bytes",
                bytes.len() - sec.end
            )));
        }
        let vectors = Slab::view(&store, sec.vectors, n * dim, "vectors")?;
        let lo = Slab::view(&store, sec.lo, dim, "quantiser")?;
        let step = Slab::view(&store, sec.step, dim, "quantiser")?;
        let levels: Slab<u8> = Slab::view(&store, sec.levels, n, "levels")?;
        let ext = Slab::view(&store, sec.ext, n, "block order")?;
        let int = Slab::view(&store, sec.int, n, "block order")?;
        let upper_off: Slab<u64> = Slab::view(&store, sec.upper_off, n + 1, "upper offsets")?;
        let upper: Slab<u32> = Slab::view(&store, sec.upper, upper_len, "upper links")?;
        let blocks = Slab::view(&store, sec.blocks, n * block, "code blocks")?;
        check_levels(&levels, entry, max_level)?;
        check_upper(&levels, &upper_off, &upper, m)?;
        let codes = Codes::from_parts(dim, m0, blocks, ext, int, lo, step)
            .map_err(|e| IndexError::Invalid(format!("corrupt HNSW layer 0: {e}")))?;
        Ok(Hnsw {
            dot: crate::simd::select(),
            dot_rows: crate::simd::select_rows(),
            dim,
            m,
            m0,
            ef_construction,
            ef_search,
            vectors,
            levels,
            upper_off,
            upper,
            entry: entry as u32,
            max_level,
            codes,
            layout,
        })
    }

    /// The first file format: row-ordered layer-0 lists and nested upper lists, no codes.
    fn from_bytes_v1(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader {
            bytes,
            pos: MAGIC1.len(),
        };
        let mut h = [0usize; 7];
        for x in &mut h {
            *x = r.u64()? as usize;
        }
        let [dim, m, ef_construction, ef_search, n, entry, max_level] = h;
        check_header(
            [dim, m, ef_construction, ef_search, n, entry, max_level],
            bytes.len(),
        )?;
        let m0 = 2 * m;
        let vectors = r.f32s(n * dim)?;
        if let Some(i) = vectors.iter().position(|x| !x.is_finite()) {
            return Err(IndexError::Invalid(format!(
                "corrupt HNSW body: vector {} holds a non-finite value",
                i / dim
            )));
        }
        let levels = r.take(n)?.to_vec();
        check_levels(&levels, entry, max_level)?;
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
                lists.push(r.u32s(len)?);
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
        let (upper_off, upper) = flatten_upper(upper);
        check_upper(&levels, &upper_off, &upper, m)?;
        Ok(Self::assemble(
            Header {
                dim,
                m,
                ef_construction,
                ef_search,
                entry: entry as u32,
                max_level,
            },
            &vectors,
            levels,
            (&links0, &len0),
            (upper_off, upper),
            Layout::Auto,
        ))
    }
}

/// The scalar fields of an index.
struct Header {
    dim: usize,
    m: usize,
    ef_construction: usize,
    ef_search: usize,
    entry: u32,
    max_level: usize,
}

/// [`Layout::Auto`] takes the codes when they rank at least this share of the exact 10
/// nearest among their own 10 nearest (see [`Hnsw::code_fidelity`]).
pub const AUTO_FIDELITY: f64 = 0.95;

/// Header checks shared by both formats: every bound a corrupt value could break.
fn check_header(fields: [usize; 7], file_len: usize) -> Result<()> {
    let [dim, m, ef_construction, ef_search, n, entry, max_level] = fields;
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
    if n.saturating_mul(dim).saturating_mul(4) > file_len {
        return bad("n", n, "more vectors than the file holds");
    }
    if n > 0 && entry >= n {
        return bad("entry", entry, &format!("expected < n = {n}"));
    }
    if max_level > MAX_LEVEL {
        return bad("max_level", max_level, &format!("at most {MAX_LEVEL}"));
    }
    Ok(())
}

fn check_levels(levels: &[u8], entry: usize, max_level: usize) -> Result<()> {
    if let Some((v, &l)) = levels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize > max_level)
    {
        return Err(IndexError::Invalid(format!(
            "corrupt HNSW body: node {v} has level {l} above max_level {max_level}"
        )));
    }
    if let Some(&l) = levels.get(entry) {
        if l as usize != max_level {
            return Err(IndexError::Invalid(format!(
                "corrupt HNSW header: max_level {max_level} but the entry point's level is {l}"
            )));
        }
    }
    Ok(())
}

/// Upper-layer lists: each node's run holds exactly one list per layer it is on, at most `m`
/// long, and links on layer `l` lead to nodes that are on layer `l` (so a walk never leaves
/// the graph).
fn check_upper(levels: &[u8], off: &[u64], ids: &[u32], m: usize) -> Result<()> {
    let n = levels.len();
    if off.len() != n + 1 || off.first() != Some(&0) || off[n] as usize != ids.len() {
        return Err(IndexError::Invalid(
            "corrupt HNSW links: upper-layer offsets do not cover the lists".into(),
        ));
    }
    // Nodes are checked on every core; the first bad node is the one reported.
    let node = |v: usize| -> Option<String> {
        let level = levels[v];
        let (start, end) = (off[v] as usize, off[v + 1] as usize);
        if start > end || end > ids.len() {
            return Some(format!("has upper-layer lists at {start}..{end}"));
        }
        let mut p = start;
        for layer in 1..=level as usize {
            let len = ids.get(p).copied().unwrap_or(u32::MAX) as usize;
            if len > m || p + 1 + len > end {
                return Some(format!("has a bad list on layer {layer}"));
            }
            for &u in &ids[p + 1..p + 1 + len] {
                if levels.get(u as usize).is_none_or(|&l| (l as usize) < layer) {
                    return Some(format!("links to node {u} on layer {layer}"));
                }
            }
            p += 1 + len;
        }
        (p != end).then(|| format!("has {} stray upper-layer values", end - p))
    };
    match (0..n)
        .into_par_iter()
        .with_min_len(4096)
        .find_map_first(|v| node(v).map(|what| (v, what)))
    {
        Some((v, what)) => Err(IndexError::Invalid(format!(
            "corrupt HNSW links: node {v} {what}"
        ))),
        None => Ok(()),
    }
}

const MAGIC1: &[u8] = b"TANDEM-HNSW-1\0\0\0";
const MAGIC2: &[u8] = b"TANDEM-HNSW-2\0\0\0";
/// Magic and nine u64 header fields.
const HEADER2: usize = 16 + 9 * 8;

/// Where each array of a second-format file starts (byte offsets, each on a cache line), and
/// where the file ends: vectors (`n × dim` f32), the quantiser's `lo` and `step` (`dim` f32
/// each), levels (`n` bytes), block → row and row → block (`n` u32 each), upper-layer offsets
/// (`n + 1` u64) and runs (u32), then the `n` code blocks.
struct Sections {
    vectors: usize,
    lo: usize,
    step: usize,
    levels: usize,
    ext: usize,
    int: usize,
    upper_off: usize,
    upper: usize,
    blocks: usize,
    end: usize,
}

impl Sections {
    /// `None` when the sizes overflow (a corrupt header).
    fn new(n: usize, dim: usize, upper_len: usize, block: usize) -> Option<Self> {
        let mut at = align_up(HEADER2);
        let mut next = |bytes: Option<usize>| -> Option<usize> {
            let start = at;
            at = align_up(start.checked_add(bytes?)?);
            Some(start)
        };
        let vectors = next(n.checked_mul(dim)?.checked_mul(4))?;
        let lo = next(dim.checked_mul(4))?;
        let step = next(dim.checked_mul(4))?;
        let levels = next(Some(n))?;
        let ext = next(n.checked_mul(4))?;
        let int = next(n.checked_mul(4))?;
        let upper_off = next(n.checked_add(1)?.checked_mul(8))?;
        let upper = next(upper_len.checked_mul(4))?;
        let blocks = next(Some(0))?;
        let end = blocks.checked_add(n.checked_mul(block)?)?;
        Some(Sections {
            vectors,
            lo,
            step,
            levels,
            ext,
            int,
            upper_off,
            upper,
            blocks,
            end,
        })
    }
}

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

    fn is_mapped(&self) -> bool {
        Hnsw::is_mapped(self)
    }

    fn layout(&self) -> Layout {
        self.layout
    }

    fn code_fidelity(&self) -> Option<f64> {
        Some(Hnsw::code_fidelity(self))
    }

    fn links_per_node(&self) -> Option<f64> {
        let n = self.levels.len();
        let view = self.codes.view();
        let mut list = Vec::with_capacity(self.m0);
        let total: usize = (0..n as u32)
            .map(|b| {
                list.clear();
                view.links(b, &mut list);
                list.len()
            })
            .sum();
        Some(total as f64 / n.max(1) as f64)
    }

    fn search(&self, q: &[f32], k: usize, ef: usize) -> Vec<(u32, f32)> {
        self.walk(q, k, ef, None)
    }

    fn search_filtered(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        skip: &dyn Fn(u32) -> bool,
    ) -> Vec<(u32, f32)> {
        self.walk(q, k, ef, Some(skip))
    }

    fn to_bytes(&self) -> Vec<u8> {
        Hnsw::to_bytes(self)
    }
}

impl Hnsw {
    /// The search behind [`AnnIndex::search`] and [`AnnIndex::search_filtered`]: without a
    /// `skip`, pooled nodes are not mapped back to rows until the answer.
    fn walk(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        skip: Option<&dyn Fn(u32) -> bool>,
    ) -> Vec<(u32, f32)> {
        let n = self.levels.len();
        if n == 0 || k == 0 {
            return Vec::new();
        }
        let (ef, keep) = (ef.max(1), ef.max(k));
        let (dim, dot, dot_rows) = (self.dim, self.dot, self.dot_rows);
        let vectors: &[f32] = &self.vectors;
        let mut ep = Cand {
            d: self.dist(q, self.entry),
            id: self.entry,
        };
        // The graph links block numbers (see `quant`): vector `b` is block `b`'s, and rows
        // come back through the block order at the end.
        let codes = self.codes.view();
        SCRATCH.with(|cell| {
            let scratch = &mut *cell.borrow_mut();
            for layer in (1..=self.max_level).rev() {
                ep = self.greedy_upper(q, ep, layer, &mut scratch.scores);
            }
            scratch.visited.reset(n);
            if self.layout == Layout::F32 {
                search_pool(
                    ep,
                    ef,
                    keep,
                    scratch,
                    |ids, out| {
                        dot_rows(q, vectors, dim, ids, out);
                        out.iter_mut().for_each(|d| *d = -*d);
                    },
                    |b, buf| codes.links(b, buf),
                    |b| prefetch_f32(row(vectors, dim, b)),
                    |b| codes.prefetch_links(b),
                    |b| skip.is_some_and(|f| f(codes.external(b))),
                );
                return scratch
                    .pool
                    .iter()
                    .take(k)
                    .map(|c| (codes.external(c.id), -c.d))
                    .collect();
            }
            // On codes: the walk ranks by code scores, then the `ef` candidates it kept are
            // re-scored exactly and the best k of those returned.
            let mut cq = std::mem::take(&mut scratch.query);
            codes.prepare_into(q, &mut cq);
            search_pool(
                Cand {
                    d: -codes.score(&cq, ep.id),
                    id: ep.id,
                },
                ef,
                keep,
                scratch,
                |ids, out| {
                    for (o, &b) in out.iter_mut().zip(ids) {
                        *o = -codes.score(&cq, b);
                    }
                },
                |b, buf| codes.links(b, buf),
                |b| codes.prefetch(b),
                |b| codes.prefetch_links(b),
                |b| skip.is_some_and(|f| f(codes.external(b))),
            );
            scratch.query = cq;
            for s in scratch.pool.iter() {
                prefetch_f32(row(vectors, dim, s.id));
            }
            let mut exact: Vec<(u32, f32)> = scratch
                .pool
                .iter()
                .map(|s| (codes.external(s.id), dot(q, row(vectors, dim, s.id))))
                .collect();
            exact.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            exact.truncate(k);
            exact
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first file format as wave 1 wrote it: header, vectors, levels, layer-0 counts and
    /// lists in row order, then each node's upper lists as `[len, ids…]`.
    fn to_bytes_v1(h: &Hnsw) -> Vec<u8> {
        let (links0, len0) = h.lists_from_codes();
        let n = h.levels.len() as u32;
        let mut out = MAGIC1.to_vec();
        for x in [
            h.dim,
            h.m,
            h.ef_construction,
            h.ef_search,
            n as usize,
            h.codes.external(h.entry) as usize,
            h.max_level,
        ] {
            out.extend_from_slice(&(x as u64).to_le_bytes());
        }
        for r in 0..n {
            let v = row(&h.vectors, h.dim, h.codes.internal(r));
            out.extend_from_slice(bytemuck::cast_slice(v));
        }
        out.extend((0..n).map(|r| h.levels[h.codes.internal(r) as usize]));
        out.extend_from_slice(bytemuck::cast_slice(&len0));
        out.extend_from_slice(bytemuck::cast_slice(&links0));
        let mut upper = Vec::new();
        for r in 0..n {
            let b = h.codes.internal(r) as usize;
            let run = &h.upper[h.upper_off[b] as usize..h.upper_off[b + 1] as usize];
            renumber_run(run, |u| h.codes.external(u), &mut upper);
        }
        out.extend_from_slice(bytemuck::cast_slice(&upper));
        out
    }

    #[test]
    fn layer0_lists_are_rewritten_in_place_and_end_at_their_mark() {
        let (dim, m, n) = (4, 2, 6);
        let vectors = crate::synthetic_embeddings(n, dim, 2, 1, 3);
        let levels = vec![0u8; n];
        let b = Builder {
            dot: crate::simd::select(),
            dim,
            m,
            m0: 2 * m,
            ef_construction: 8,
            vectors: &vectors,
            levels: &levels,
            nodes: (0..n)
                .map(|_| Mutex::new(Node { up: Vec::new() }))
                .collect(),
            l0: (0..n * 2 * m).map(|_| AtomicU32::new(NO_LINK)).collect(),
            fill: true,
            ready: (0..n).map(|_| AtomicBool::new(true)).collect(),
            top: RwLock::new((0, 0)),
            grow: Mutex::new(()),
        };
        let read = |id| {
            let mut out = Vec::new();
            b.read_l0(id, &mut out);
            out
        };
        assert!(read(1).is_empty());
        b.write_l0(1, &[0, 2, 3], &[]);
        assert_eq!(read(1), [0, 2, 3]);
        b.write_l0(1, &[2], &[]);
        assert_eq!(read(1), [2], "a shorter list ends at its mark");
        b.write_l0(1, &[0, 2, 3, 4], &[]);
        assert_eq!(read(1), [0, 2, 3, 4], "a full list needs no mark");
        assert!(
            read(0).is_empty() && read(2).is_empty(),
            "neighbours untouched"
        );
        // Reverse links: a new one is appended once; to a full list, the new link and the old
        // ones are re-selected, never overrunning the list.
        b.link(0, 1, 0, 2 * m);
        b.link(0, 1, 0, 2 * m);
        assert_eq!(read(0), [1]);
        b.link(1, 5, 0, 2 * m);
        let after = read(1);
        assert!(!after.is_empty() && after.len() <= 2 * m, "{after:?}");
        assert!(
            after.iter().all(|id| [0, 2, 3, 4, 5].contains(id)),
            "{after:?}"
        );
        // A fill sits after the list's mark: searches while building read the list alone.
        let fill = |id| {
            let mut out = Vec::new();
            b.read_fill(id, &mut out);
            out
        };
        b.write_l0(2, &[0], &[3, 4]);
        assert_eq!((read(2), fill(2)), (vec![0], vec![3, 4]));
        b.write_l0(2, &[0], &[3]);
        assert_eq!(fill(2), [3], "a shorter fill ends at its own mark");
        // A reverse link that was in the fill moves to the list; the fill shrinks to fit.
        b.write_l0(2, &[0], &[3, 4]);
        b.link(2, 3, 0, 2 * m);
        assert_eq!((read(2), fill(2)), (vec![0, 3], vec![4]));
        b.write_l0(2, &[0], &[3, 4]);
        b.link(2, 5, 0, 2 * m);
        assert_eq!((read(2), fill(2)), (vec![0, 5], vec![3]));
    }

    /// Filled lists (the default) against the heuristic's alone, on the same vectors: every
    /// served list is free of repeats and self-links and holds the heuristic's links, the
    /// filled graph has more links per node, and it finds at least as many true neighbours at a
    /// small `ef`.
    #[test]
    fn filled_lists_extend_the_heuristic_lists_and_keep_recall() {
        let (n, dim) = (5_000, 32);
        let data = crate::synthetic_embeddings(n, dim, 12, 3, 4);
        let queries = crate::synthetic_embeddings(200, dim, 12, 3, 5);
        let truth = crate::Exact {
            dim,
            vectors: data.clone(),
        }
        .ground_truth(&queries, 10);
        let build = |fill| {
            let params = HnswParams {
                fill,
                layout: Layout::F32,
                ..Default::default()
            };
            Hnsw::build(data.clone(), dim, &params).unwrap()
        };
        let (plain, filled) = (build(false), build(true));
        let degree = |h: &Hnsw| {
            let (links, len) = h.lists_from_codes();
            for (v, &l) in len.iter().enumerate() {
                let list = &links[v * h.m0..v * h.m0 + l as usize];
                let mut sorted = list.to_vec();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(
                    sorted.len(),
                    list.len(),
                    "node {v}: a repeated link {list:?}"
                );
                assert!(!list.contains(&(v as u32)), "node {v} links itself");
            }
            len.iter().map(|&l| l as f64).sum::<f64>() / len.len() as f64
        };
        let (d_plain, d_filled) = (degree(&plain), degree(&filled));
        println!("links per node: {d_plain:.1} heuristic, {d_filled:.1} filled");
        assert!(d_filled > d_plain + 2.0, "{d_filled} vs {d_plain}");
        let recall = |h: &Hnsw| crate::recall_at_k(h, &queries, &truth, 10, 10);
        let (r_plain, r_filled) = (recall(&plain), recall(&filled));
        println!("recall@10 at ef 10: {r_plain:.4} heuristic, {r_filled:.4} filled");
        assert!(r_filled >= r_plain - 0.005, "{r_filled} vs {r_plain}");
    }

    #[test]
    fn first_format_files_still_load_and_answer_the_same() {
        let dim = 16;
        let data = crate::synthetic_embeddings(2000, dim, 6, 1, 2);
        let h = Hnsw::build(data.clone(), dim, &HnswParams::default()).unwrap();
        let old = to_bytes_v1(&h);
        let back = Hnsw::from_bytes(&old).unwrap();
        assert_eq!(
            back.layout(),
            h.layout(),
            "the layout is measured the same way"
        );
        for q in data.chunks_exact(dim).take(20) {
            assert_eq!(h.search(q, 10, 64), back.search(q, 10, 64));
        }
        assert!(Hnsw::from_bytes(&old[..old.len() - 4]).is_err());
        // Written again, it is a second-format file with the same answers.
        let again = Hnsw::from_bytes(&back.to_bytes()).unwrap();
        assert_eq!(again.layout(), h.layout());
        assert_eq!(
            h.search(&data[..dim], 10, 64),
            again.search(&data[..dim], 10, 64)
        );
    }
}
