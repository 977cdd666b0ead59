//! Scalar quantisation for graph traversal: every vector as one unsigned byte per dimension,
//! scaled per dimension between the smallest and largest value the index holds.
//!
//! A 64-d row is then 64 bytes — one cache line instead of four for `f32` — which is what a
//! graph walk pays for: each step reads the rows of a node's neighbours, scattered in memory.
//! The query side is quantised too (signed bytes, one scale for the whole query), so a code
//! distance is one exact integer dot product (AVX-512 VNNI: one instruction per 64
//! dimensions) and every CPU gets the same answer. The walk ranks by these approximate scores;
//! the best candidates are then re-ranked with the exact `f32` vectors, so results carry exact
//! scores and the recall lost to quantisation is bought back by re-ranking more of them.
//!
//! Each node's layer-0 neighbour list sits right after its code row, in the same block
//! (`[code | links]`, padded to whole cache lines): scoring a node brings the start of its list
//! into cache with it, so expanding it later rarely misses. Unused link slots hold `u32::MAX`.
//!
//! Blocks are stored in breadth-first order of the layer-0 graph from the entry point, not in
//! row order: nodes a walk visits together then sit near each other in memory (fewer TLB and
//! cache misses, and the hardware prefetcher's adjacent lines are useful). Block numbers are
//! internal; [`Codes::internal`] and [`Codes::external`] translate to and from row ids.

use rayon::prelude::*;

use crate::simd::{prefetch, DotU8Fn};
use crate::store::Slab;

/// Rows are padded to whole cache lines (and the first row starts on one).
const LINE: usize = 64;

/// The codes of every row, with the per-dimension scale that decodes them.
pub struct Codes {
    dim: usize,
    /// Bytes per code row: `dim` rounded up to a whole number of cache lines.
    stride: usize,
    /// Link slots after each code row.
    slots: usize,
    /// Bytes per node: code row and links, rounded up to whole cache lines.
    block: usize,
    /// Where node 0's block starts in `bytes` (so that blocks start on cache lines).
    offset: usize,
    bytes: Slab<u8>,
    /// Block number → row id, and row id → block number.
    ext: Slab<u32>,
    int: Slab<u32>,
    /// Per dimension: value of code 0, and the step between codes.
    lo: Slab<f32>,
    step: Slab<f32>,
    dot: DotU8Fn,
}

/// The arrays of [`Codes`] as plain slices, taken once per query (a mapped array costs a
/// check each time it is looked at; a slice does not).
#[derive(Clone, Copy)]
pub struct CodeView<'a> {
    stride: usize,
    slots: usize,
    block: usize,
    bytes: &'a [u8],
    ext: &'a [u32],
    int: &'a [u32],
    lo: &'a [f32],
    step: &'a [f32],
    dot: DotU8Fn,
}

/// A query prepared for code distances: `score ≈ base + scale · Σ code·(128·hi + lo)`.
///
/// The query's weights are 15-bit integers split into a high and a low signed byte, so the
/// query side adds almost no error (one part in 16,000 of its largest weight): with one byte
/// per weight it added about twice the codes' own error, which learned embeddings whose
/// neighbours differ in the fourth decimal could not afford (recall 0.62 instead of 0.93 at
/// ef 10 on a trained model's items).
#[derive(Default)]
pub struct CodeQuery {
    hi: Vec<i8>,
    lo: Vec<i8>,
    scale: f32,
    base: f32,
}

/// Largest magnitude of a query weight: 127·128 + 64 keeps `lo` within −64..=64.
const WEIGHT_MAX: f32 = 127.0 * 128.0;

/// The sizes a code layout of `dim` dimensions and `slots` link slots has: bytes per code row
/// and per block.
pub fn block_shape(dim: usize, slots: usize) -> (usize, usize) {
    let stride = dim.div_ceil(LINE).max(1) * LINE;
    (stride, (stride + slots * 4).div_ceil(LINE) * LINE)
}

impl Codes {
    /// Quantises `vectors` (`n × dim`, row-major) and lays each code row out with its node's
    /// layer-0 list: `links` holds `slots` ids per node, `len[v]` of them valid (no lists with
    /// `slots = 0`). Blocks are ordered breadth-first from row `entry`.
    pub fn new(
        vectors: &[f32],
        dim: usize,
        links: &[u32],
        len: &[u16],
        slots: usize,
        entry: u32,
    ) -> Self {
        let n = vectors.len().checked_div(dim).unwrap_or(0);
        let ext = bfs_order(n, links, len, slots, entry);
        let mut int = vec![0u32; n];
        for (i, &e) in ext.iter().enumerate() {
            int[e as usize] = i as u32;
        }
        let mut lo = vec![f32::INFINITY; dim];
        let mut hi = vec![f32::NEG_INFINITY; dim];
        for row in vectors.chunks_exact(dim.max(1)) {
            for (j, &x) in row.iter().enumerate() {
                lo[j] = lo[j].min(x);
                hi[j] = hi[j].max(x);
            }
        }
        let step: Vec<f32> = lo
            .iter_mut()
            .zip(&hi)
            .map(|(l, &h)| {
                if !l.is_finite() {
                    *l = 0.0;
                }
                // A constant dimension gets step 0: every code 0, no query weight, and its
                // value is carried exactly by the query's base term.
                let s = (h - *l) / 255.0;
                if s.is_finite() && s > 0.0 {
                    s
                } else {
                    0.0
                }
            })
            .collect();
        let (stride, block) = block_shape(dim, slots);
        let mut bytes = vec![0u8; n * block + LINE];
        let offset = (LINE - bytes.as_ptr() as usize % LINE) % LINE;
        for (i, row) in vectors.chunks_exact(dim.max(1)).enumerate() {
            let at = offset + int[i] as usize * block;
            let out = &mut bytes[at..at + dim];
            for (j, (&x, o)) in row.iter().zip(out).enumerate() {
                if step[j] > 0.0 {
                    *o = ((x - lo[j]) / step[j]).round().clamp(0.0, 255.0) as u8;
                }
            }
            if slots > 0 {
                let valid = len.get(i).copied().unwrap_or(0) as usize;
                let list = &links[i * slots..(i + 1) * slots];
                let out = &mut bytes[at + stride..at + stride + slots * 4];
                for (k, o) in out.chunks_exact_mut(4).enumerate() {
                    let id = if k < valid {
                        int[list[k] as usize]
                    } else {
                        u32::MAX
                    };
                    o.copy_from_slice(&id.to_le_bytes());
                }
            }
        }
        Codes {
            dim,
            stride,
            slots,
            block,
            offset,
            bytes: bytes.into(),
            ext: ext.into(),
            int: int.into(),
            lo: lo.into(),
            step: step.into(),
            dot: crate::simd::select_u8(),
        }
    }

    /// Codes seen in a loaded file: `blocks` holds `n` blocks of [`block_shape`]`(dim, slots)`
    /// starting on a cache line. Refused unless every link is a block number or the
    /// sentinel and `ext`/`int` are inverse permutations, so no lookup can go out of bounds.
    pub fn from_parts(
        dim: usize,
        slots: usize,
        blocks: Slab<u8>,
        ext: Slab<u32>,
        int: Slab<u32>,
        lo: Slab<f32>,
        step: Slab<f32>,
    ) -> Result<Self, String> {
        let (stride, block) = block_shape(dim, slots);
        let n = ext.len();
        if int.len() != n || blocks.len() != n * block || lo.len() != dim || step.len() != dim {
            return Err("code section sizes do not match the header".into());
        }
        if !(blocks.as_ptr() as usize).is_multiple_of(LINE) {
            return Err("code blocks do not start on a cache line".into());
        }
        // Checked on every core (at 10M vectors these passes read the whole file), reporting
        // the first offender as a sequential pass would.
        let unmapped = int
            .par_iter()
            .enumerate()
            .find_first(|&(row, &b)| ext.get(b as usize).copied() != Some(row as u32));
        if let Some((row, b)) = unmapped {
            return Err(format!(
                "row {row}'s block number {b} does not map back to it"
            ));
        }
        let stray = blocks
            .par_chunks_exact(block)
            .enumerate()
            .find_map_first(|(b, chunk)| {
                chunk[stride..stride + slots * 4]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .find(|&nb| nb != u32::MAX && nb as usize >= n)
                    .map(|nb| (b, nb))
            });
        if let Some((b, nb)) = stray {
            return Err(format!("block {b} links to block {nb} (n = {n})"));
        }
        if let Some(j) = lo.iter().chain(step.iter()).position(|x| !x.is_finite()) {
            return Err(format!("quantiser scale {j} is not finite"));
        }
        Ok(Codes {
            dim,
            stride,
            slots,
            block,
            offset: 0,
            bytes: blocks,
            ext,
            int,
            lo,
            step,
            dot: crate::simd::select_u8(),
        })
    }

    /// The arrays as slices, for one query's worth of lookups.
    #[inline]
    pub fn view(&self) -> CodeView<'_> {
        CodeView {
            stride: self.stride,
            slots: self.slots,
            block: self.block,
            bytes: &self.bytes[self.offset..],
            ext: &self.ext,
            int: &self.int,
            lo: &self.lo,
            step: &self.step,
            dot: self.dot,
        }
    }

    /// The blocks, in block order (what a file stores).
    pub fn blocks(&self) -> &[u8] {
        &self.bytes[self.offset..self.offset + self.ext.len() * self.block]
    }

    /// Block number → row id, row id → block number, and the per-dimension quantiser.
    pub fn maps(&self) -> (&[u32], &[u32], &[f32], &[f32]) {
        (&self.ext, &self.int, &self.lo, &self.step)
    }

    /// Bytes per vector: the code row and the copy of its links (padding included).
    pub fn bytes_per_vector(&self) -> usize {
        self.block
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The block number of row `row`.
    pub fn internal(&self, row: u32) -> u32 {
        self.view().internal(row)
    }

    /// The row id of block `id`.
    pub fn external(&self, id: u32) -> u32 {
        self.view().external(id)
    }

    /// Appends block `id`'s layer-0 neighbours to `out`.
    pub fn links(&self, id: u32, out: &mut Vec<u32>) {
        self.view().links(id, out)
    }
}

impl<'a> CodeView<'a> {
    /// The block number of row `row`.
    #[inline]
    pub fn internal(&self, row: u32) -> u32 {
        self.int[row as usize]
    }

    /// The row id of block `id`.
    #[inline]
    pub fn external(&self, id: u32) -> u32 {
        self.ext[id as usize]
    }

    /// The code row of block `id`.
    #[inline]
    pub fn row(&self, id: u32) -> &'a [u8] {
        let s = id as usize * self.block;
        &self.bytes[s..s + self.stride]
    }

    /// Appends block `id`'s layer-0 neighbours (block numbers, stored beside its code row) to
    /// `out`.
    #[inline]
    pub fn links(&self, id: u32, out: &mut Vec<u32>) {
        let s = id as usize * self.block + self.stride;
        for c in self.bytes[s..s + self.slots * 4].chunks_exact(4) {
            let nb = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            if nb == u32::MAX {
                break;
            }
            out.push(nb);
        }
    }

    /// Starts loading node `id`'s code row into cache (the walk calls this for a node's
    /// unvisited neighbours before scoring any of them).
    #[inline]
    pub fn prefetch(&self, id: u32) {
        let s = id as usize * self.block;
        if let Some(b) = self.bytes.get(s) {
            prefetch(b);
        }
    }

    /// Starts loading block `id`'s layer-0 list (the walk calls this when a node enters its
    /// pool of nodes to expand).
    #[inline]
    pub fn prefetch_links(&self, id: u32) {
        let s = id as usize * self.block + self.stride;
        for at in (s..s + self.slots * 4).step_by(LINE) {
            if let Some(b) = self.bytes.get(at) {
                prefetch(b);
            }
        }
    }

    pub fn prepare(&self, q: &[f32]) -> CodeQuery {
        let mut cq = CodeQuery::default();
        self.prepare_into(q, &mut cq);
        cq
    }

    /// [`prepare`](Self::prepare) into a query whose buffers are reused from search to search.
    pub fn prepare_into(&self, q: &[f32], cq: &mut CodeQuery) {
        let max = q
            .iter()
            .zip(self.step)
            .fold(0f32, |m, (x, s)| m.max((x * s).abs()));
        cq.scale = if max > 0.0 { max / WEIGHT_MAX } else { 1.0 };
        for part in [&mut cq.hi, &mut cq.lo] {
            part.clear();
            part.resize(self.stride, 0);
        }
        for (j, (x, s)) in q.iter().zip(self.step).enumerate() {
            let w = (x * s / cq.scale).round().clamp(-WEIGHT_MAX, WEIGHT_MAX) as i32;
            let hi = (w as f32 / 128.0).round() as i32;
            cq.hi[j] = hi as i8;
            cq.lo[j] = (w - 128 * hi) as i8;
        }
        cq.base = q.iter().zip(self.lo).map(|(x, l)| x * l).sum();
    }

    /// Approximate inner product of the prepared query with block `id`.
    #[inline]
    pub fn score(&self, q: &CodeQuery, id: u32) -> f32 {
        let (hi, lo) = (self.dot)(self.row(id), &q.hi, &q.lo);
        q.base + q.scale * (128.0 * hi as f32 + lo as f32)
    }
}

/// Rows in breadth-first order over the layer-0 lists from `entry`; rows the walk never
/// reaches follow in row order.
fn bfs_order(n: usize, links: &[u32], len: &[u16], slots: usize, entry: u32) -> Vec<u32> {
    let mut order = Vec::with_capacity(n);
    let mut seen = vec![false; n];
    if slots > 0 && (entry as usize) < n {
        seen[entry as usize] = true;
        order.push(entry);
        let mut head = 0;
        while head < order.len() {
            let v = order[head] as usize;
            head += 1;
            let valid = (len.get(v).copied().unwrap_or(0) as usize).min(slots);
            for &nb in &links[v * slots..v * slots + valid] {
                if let Some(s) = seen.get_mut(nb as usize) {
                    if !*s {
                        *s = true;
                        order.push(nb);
                    }
                }
            }
        }
    }
    order.extend((0..n as u32).filter(|&v| !seen[v as usize]));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_scores_track_exact_inner_products() {
        let dim = 64;
        let v = crate::synthetic_embeddings(500, dim, 16, 1, 2);
        let codes = Codes::new(&v, dim, &[], &[], 0, 0);
        assert_eq!(codes.bytes_per_vector(), 64);
        assert_eq!(
            codes.view().row(0).as_ptr() as usize % LINE,
            0,
            "rows start on a line"
        );
        let q = &v[..dim];
        let cq = codes.view().prepare(q);
        let (mut worst, mut worst_query) = (0f32, 0f32);
        assert_eq!(codes.internal(7), 7, "no lists: rows keep their order");
        let view = codes.view();
        for (i, row) in v.chunks_exact(dim).enumerate() {
            let exact: f32 = q.iter().zip(row).map(|(a, b)| a * b).sum();
            let score = view.score(&cq, i as u32);
            worst = worst.max((score - exact).abs());
            // The decoded row against the f32 query: what is left is the query's own error.
            let decoded: f32 = (0..dim)
                .map(|j| q[j] * (view.lo[j] + view.step[j] * view.row(i as u32)[j] as f32))
                .sum();
            worst_query = worst_query.max((score - decoded).abs());
        }
        println!("worst error {worst}, of it from the query {worst_query}");
        // Unit vectors, 8 bits per dimension: errors of a few thousandths, almost none of it
        // from the 15-bit query.
        assert!(worst < 0.01, "worst code-score error {worst}");
        assert!(worst_query < 2e-4, "worst query error {worst_query}");
    }

    #[test]
    fn links_are_stored_beside_each_code_row() {
        let dim = 16;
        let v = crate::synthetic_embeddings(3, dim, 4, 1, 2);
        // Row 2 is the entry: blocks are 2, then its neighbours 0 and 1.
        let links = [1, 9, 9, 9, 0, 9, 9, 9, 0, 1, 9, 9];
        let codes = Codes::new(&v, dim, &links, &[1, 1, 2], 4, 2);
        assert_eq!(
            codes.bytes_per_vector(),
            128,
            "64 code bytes + 16 link bytes, padded"
        );
        let blocks: Vec<u32> = (0..3).map(|b| codes.external(b)).collect();
        assert_eq!(blocks, [2, 0, 1]);
        let plain = Codes::new(&v, dim, &[], &[], 0, 0);
        let mut out = Vec::new();
        for (row, want) in [(0u32, vec![1u32]), (1, vec![0]), (2, vec![0, 1])] {
            out.clear();
            codes.links(codes.internal(row), &mut out);
            let rows: Vec<u32> = out.iter().map(|&b| codes.external(b)).collect();
            assert_eq!(rows, want, "row {row}");
            assert_eq!(
                codes.view().row(codes.internal(row)),
                plain.view().row(row),
                "row {row}'s code"
            );
        }
    }

    #[test]
    fn a_constant_dimension_and_odd_widths_quantise() {
        let dim = 70;
        let mut v = crate::synthetic_embeddings(50, dim, 8, 3, 4);
        for row in v.chunks_exact_mut(dim) {
            row[5] = 0.25;
        }
        let codes = Codes::new(&v, dim, &[], &[], 0, 0);
        assert_eq!(codes.bytes_per_vector(), 128);
        let cq = codes.view().prepare(&v[dim..2 * dim]);
        let exact: f32 = v[dim..2 * dim].iter().map(|x| x * x).sum();
        assert!((codes.view().score(&cq, 1) - exact).abs() < 0.03);
    }
}
