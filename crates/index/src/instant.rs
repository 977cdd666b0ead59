//! The instant-distance crate's HNSW behind [`AnnIndex`]. Its `ef` is fixed when the graph is
//! built (and M = 32), so per-query `ef` is ignored; kept for comparison in `tandem bench ann`.

use instant_distance::{Builder, HnswMap, Point, Search};
use serde::{Deserialize, Serialize};

use crate::hnsw::dot;
use crate::{AnnIndex, HnswParams, IndexError, Result};

#[derive(Clone, Serialize, Deserialize)]
struct Unit(Vec<f32>);

impl Point for Unit {
    fn distance(&self, other: &Self) -> f32 {
        1.0 - dot(&self.0, &other.0)
    }
}

#[derive(Serialize, Deserialize)]
pub struct Instant {
    dim: usize,
    ef_search: usize,
    map: HnswMap<Unit, u32>,
}

impl Instant {
    pub fn build(vectors: Vec<f32>, dim: usize, params: &HnswParams) -> Result<Self> {
        if dim == 0 || !vectors.len().is_multiple_of(dim) {
            return Err(IndexError::Invalid(format!(
                "{} values do not form vectors of dimension {dim}",
                vectors.len()
            )));
        }
        let points: Vec<Unit> = vectors
            .chunks_exact(dim)
            .map(|c| Unit(c.to_vec()))
            .collect();
        let ids: Vec<u32> = (0..points.len() as u32).collect();
        let map = Builder::default()
            .ef_construction(params.ef_construction)
            .ef_search(params.ef_search)
            .seed(params.seed)
            .build(points, ids);
        Ok(Instant {
            dim,
            ef_search: params.ef_search,
            map,
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        bincode::deserialize(bytes)
            .map_err(|e| IndexError::Invalid(format!("corrupt instant-distance index: {e}")))
    }
}

impl AnnIndex for Instant {
    fn engine(&self) -> &'static str {
        "instant-distance"
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.map.values.len()
    }

    fn default_ef(&self) -> usize {
        self.ef_search
    }

    fn search(&self, q: &[f32], k: usize, _ef: usize) -> Vec<(u32, f32)> {
        let mut search = Search::default();
        let point = Unit(q.to_vec());
        self.map
            .search(&point, &mut search)
            .take(k)
            .map(|item| (*item.value, 1.0 - item.distance))
            .collect()
    }

    fn to_bytes(&self) -> Vec<u8> {
        bincode::serialize(self).expect("in-memory serialisation cannot fail")
    }
}
