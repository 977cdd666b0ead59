//! Turning a trained model into a servable index: catalogue embeddings, recall queries from real
//! user histories, the HNSW build with its measured recall, and the embedding sanity numbers the
//! retrain gate checks.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use tandem_artifact::Published;
use tandem_data::EventLog;
use tandem_index::artifact::{publish, publish_sharded, shard_of, IndexManifest};
use tandem_index::{build, recall_at_k, AnnIndex, Exact, HnswParams};
use tandem_model::{TwoTower, UserRequest};
use tandem_types::ModelVersion;

use crate::{PipelineError, Result};

/// Every catalogue item's embedding, row-major, without the out-of-vocabulary row 0 (never a
/// search result), and the item ids in the same order.
pub fn item_vectors(model: &TwoTower) -> Result<(Vec<f32>, usize, Vec<String>)> {
    let all = model.item.embed_all()?;
    let dim = all.dim(1)?;
    let vectors: Vec<f32> = all
        .narrow(0, 1, all.dim(0)? - 1)?
        .flatten_all()?
        .to_vec1()?;
    Ok((vectors, dim, model.item.items.ids[1..].to_vec()))
}

fn embed_chunks(model: &TwoTower, reqs: &[UserRequest]) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for c in reqs.chunks(512) {
        out.extend(
            model
                .user
                .embed_requests(c)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
    }
    Ok(out)
}

/// Up to `n` user embeddings (evenly spaced over the log's users) from their full histories in
/// `log`, with a description of where they came from.
pub fn history_queries(model: &TwoTower, log: &EventLog, n: usize) -> Result<(Vec<f32>, String)> {
    let n = n.max(1);
    let hist = model.user.histories(log);
    let step = (log.users.len() / n).max(1);
    let reqs: Vec<UserRequest> = (0..log.users.len())
        .step_by(step)
        .take(n)
        .map(|u| model.user.request_of(&hist, log.users.name(u as u32), u))
        .collect();
    let q = embed_chunks(model, &reqs)?;
    Ok((q, format!("histories of {} users", reqs.len())))
}

/// Up to `n` user embeddings from stored profiles with empty histories.
pub fn profile_queries(model: &TwoTower, n: usize) -> Result<(Vec<f32>, String)> {
    let users = &model.user.users.ids;
    let step = (users.len() / n.max(1)).max(1);
    let reqs: Vec<UserRequest> = users
        .iter()
        .step_by(step)
        .take(n.max(1))
        .map(|u| UserRequest {
            user: u,
            ..Default::default()
        })
        .collect();
    let q = embed_chunks(model, &reqs)?;
    Ok((
        q,
        format!("profiles of {} users (no histories given)", reqs.len()),
    ))
}

/// Largest |‖row‖ − 1| over `vectors`; NaN if any value is not finite.
pub fn max_norm_error(vectors: &[f32], dim: usize) -> f64 {
    let mut worst = 0.0f64;
    for row in vectors.chunks(dim.max(1)) {
        if row.iter().any(|x| !x.is_finite()) {
            return f64::NAN;
        }
        let norm = row
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt();
        worst = worst.max((norm - 1.0).abs());
    }
    worst
}

/// A built index with what its manifest records.
pub struct BuiltIndex {
    pub index: Box<dyn AnnIndex>,
    pub items: Vec<String>,
    pub dim: usize,
    pub build_seconds: f64,
    pub embed_seconds: f64,
    pub ann_recall_at_10: f64,
    pub recall_queries: usize,
    pub recall_query_source: String,
    pub params: HnswParams,
    /// |‖e‖ − 1| over the catalogue (NaN if not finite).
    pub item_norm_error: f64,
}

/// Embeds the catalogue, builds the index and measures its recall@10 on `queries` against exact
/// search at the index's default `ef`.
pub fn build_index(
    model: &TwoTower,
    params: &HnswParams,
    queries: (Vec<f32>, String),
) -> Result<BuiltIndex> {
    let started = Instant::now();
    let (vectors, dim, items) = item_vectors(model)?;
    let embed_seconds = started.elapsed().as_secs_f64();
    if items.is_empty() {
        return Err(PipelineError::NoItems);
    }
    let item_norm_error = max_norm_error(&vectors, dim);
    let t = Instant::now();
    let index = build(vectors.clone(), dim, params)?;
    let build_seconds = t.elapsed().as_secs_f64();
    let (q, source) = queries;
    let truth = Exact { dim, vectors }.ground_truth(&q, 10);
    let recall = recall_at_k(index.as_ref(), &q, &truth, 10, index.ef_for(10));
    Ok(BuiltIndex {
        index,
        items,
        dim,
        build_seconds,
        embed_seconds,
        ann_recall_at_10: recall,
        recall_queries: truth.len(),
        recall_query_source: source,
        params: params.clone(),
        item_norm_error,
    })
}

/// A catalogue split into shards by [`shard_of`], one index per shard.
pub struct BuiltShards {
    /// Shard `i`'s index and item ids.
    pub parts: Vec<(Box<dyn AnnIndex>, Vec<String>)>,
    pub dim: usize,
    pub build_seconds: f64,
    /// Recall@10 of the merged answer (each shard searched for 10, the union's top 10) against
    /// exact search over the whole catalogue.
    pub ann_recall_at_10: f64,
    pub recall_queries: usize,
    pub recall_query_source: String,
    pub params: HnswParams,
    /// |‖e‖ − 1| over the catalogue (NaN if not finite).
    pub item_norm_error: f64,
}

/// Builds `shards` indexes over the catalogue split by [`shard_of`], and measures the merged
/// recall the orchestrator's fan-out would get.
pub fn build_sharded_index(
    model: &TwoTower,
    params: &HnswParams,
    queries: (Vec<f32>, String),
    shards: u32,
) -> Result<BuiltShards> {
    let (vectors, dim, items) = item_vectors(model)?;
    if items.is_empty() {
        return Err(PipelineError::NoItems);
    }
    let item_norm_error = max_norm_error(&vectors, dim);
    let t = Instant::now();
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); shards as usize];
    for (r, id) in items.iter().enumerate() {
        rows[shard_of(id, shards) as usize].push(r);
    }
    let mut parts = Vec::with_capacity(rows.len());
    for (i, rs) in rows.iter().enumerate() {
        if rs.is_empty() {
            return Err(PipelineError::Invalid(format!(
                "shard {i} of {shards} would be empty ({} items): use fewer shards",
                items.len()
            )));
        }
        let v: Vec<f32> = rs
            .iter()
            .flat_map(|&r| vectors[r * dim..(r + 1) * dim].iter().copied())
            .collect();
        let ids: Vec<String> = rs.iter().map(|&r| items[r].clone()).collect();
        parts.push((build(v, dim, params)?, ids));
    }
    let build_seconds = t.elapsed().as_secs_f64();
    let (q, source) = queries;
    let truth = Exact { dim, vectors }.ground_truth(&q, 10);
    let mut hit = 0.0;
    for (qv, t) in q.chunks(dim).zip(&truth) {
        // Shard-local rows back to catalogue rows, then the merged top 10.
        let mut merged: Vec<(usize, f32)> = parts
            .iter()
            .zip(&rows)
            .flat_map(|((idx, _), rs)| {
                idx.search(qv, 10, idx.ef_for(10))
                    .into_iter()
                    .map(|(r, s)| (rs[r as usize], s))
            })
            .collect();
        merged.sort_by(|a, b| b.1.total_cmp(&a.1));
        let found: std::collections::HashSet<usize> =
            merged.iter().take(10).map(|&(r, _)| r).collect();
        hit += t
            .iter()
            .take(10)
            .filter(|&&r| found.contains(&(r as usize)))
            .count() as f64
            / t.len().clamp(1, 10) as f64;
    }
    Ok(BuiltShards {
        parts,
        dim,
        build_seconds,
        ann_recall_at_10: hit / truth.len().max(1) as f64,
        recall_queries: truth.len(),
        recall_query_source: source,
        params: params.clone(),
        item_norm_error,
    })
}

/// A version's index, whole or split into shards.
pub enum Built {
    Whole(BuiltIndex),
    Sharded(BuiltShards),
}

impl Built {
    /// Builds one index (`shards` ≤ 1) or `shards` of them over the catalogue of `model`.
    pub fn build(
        model: &TwoTower,
        params: &HnswParams,
        queries: (Vec<f32>, String),
        shards: u32,
    ) -> Result<Built> {
        Ok(if shards <= 1 {
            Built::Whole(build_index(model, params, queries)?)
        } else {
            Built::Sharded(build_sharded_index(model, params, queries, shards)?)
        })
    }

    /// Recall@10 against exact search over the whole catalogue (of the merged answer when
    /// sharded).
    pub fn ann_recall_at_10(&self) -> f64 {
        match self {
            Built::Whole(b) => b.ann_recall_at_10,
            Built::Sharded(b) => b.ann_recall_at_10,
        }
    }

    pub fn item_norm_error(&self) -> f64 {
        match self {
            Built::Whole(b) => b.item_norm_error,
            Built::Sharded(b) => b.item_norm_error,
        }
    }

    pub fn publish(
        &self,
        root: &Path,
        name: &str,
        version: ModelVersion,
        feature_schema_hash: &str,
    ) -> Result<(Published, IndexManifest)> {
        match self {
            Built::Whole(b) => b.publish(root, name, version, feature_schema_hash),
            Built::Sharded(b) => b.publish(root, name, version, feature_schema_hash),
        }
    }
}

/// The manifest fields every index version shares; `hash` identifies its content.
#[allow(clippy::too_many_arguments)]
fn manifest(
    name: &str,
    version: ModelVersion,
    hash: &str,
    item_count: u64,
    dim: usize,
    params: &HnswParams,
    build_seconds: f64,
    recall: (f64, usize, &str),
    feature_schema_hash: &str,
) -> IndexManifest {
    IndexManifest {
        versions: BTreeMap::from([(name.to_string(), version)]),
        index_id: format!("{name}-{version}-{}", &hash[..12]),
        model_name: name.to_string(),
        model_version: version,
        item_count,
        dim,
        params: params.clone(),
        build_seconds,
        ann_recall_at_10: recall.0,
        recall_queries: recall.1,
        recall_query_source: recall.2.to_string(),
        feature_schema_hash: feature_schema_hash.to_string(),
        shards: 0,
        shard_items: Vec::new(),
    }
}

impl BuiltShards {
    /// Publishes every shard together as `indexes/<name>/<version>`.
    pub fn publish(
        &self,
        root: &Path,
        name: &str,
        version: ModelVersion,
        feature_schema_hash: &str,
    ) -> Result<(Published, IndexManifest)> {
        let mut hasher = String::new();
        for (idx, _) in &self.parts {
            hasher.push_str(&tandem_artifact::sha256_hex(&idx.to_bytes()));
        }
        let hash = tandem_artifact::sha256_hex(hasher.as_bytes());
        let meta = IndexManifest {
            shards: self.parts.len() as u32,
            shard_items: self.parts.iter().map(|(_, i)| i.len() as u64).collect(),
            ..manifest(
                name,
                version,
                &hash,
                self.parts.iter().map(|(_, i)| i.len() as u64).sum(),
                self.dim,
                &self.params,
                self.build_seconds,
                (
                    self.ann_recall_at_10,
                    self.recall_queries,
                    &self.recall_query_source,
                ),
                feature_schema_hash,
            )
        };
        let parts: Vec<(&dyn AnnIndex, &[String])> = self
            .parts
            .iter()
            .map(|(idx, ids)| (idx.as_ref(), ids.as_slice()))
            .collect();
        let published = publish_sharded(root, &parts, &meta)?;
        Ok((published, meta))
    }
}

impl BuiltIndex {
    /// Publishes as `indexes/<name>/<version>` with the version metadata (model → version).
    pub fn publish(
        &self,
        root: &Path,
        name: &str,
        version: ModelVersion,
        feature_schema_hash: &str,
    ) -> Result<(Published, IndexManifest)> {
        let hash = tandem_artifact::sha256_hex(&self.index.to_bytes());
        let meta = manifest(
            name,
            version,
            &hash,
            self.items.len() as u64,
            self.dim,
            &self.params,
            self.build_seconds,
            (
                self.ann_recall_at_10,
                self.recall_queries,
                &self.recall_query_source,
            ),
            feature_schema_hash,
        );
        let published = publish(root, self.index.as_ref(), &self.items, &meta)?;
        Ok((published, meta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_error_is_zero_for_unit_rows_and_nan_for_non_finite_values() {
        assert!(max_norm_error(&[1.0, 0.0, 0.6, 0.8], 2) < 1e-6);
        assert!((max_norm_error(&[2.0, 0.0], 2) - 1.0).abs() < 1e-9);
        assert!(max_norm_error(&[f32::NAN, 0.0], 2).is_nan());
    }
}
