//! `tandem index`: embeds every catalogue item with one model version's item tower, builds the
//! HNSW index, measures its recall against exact search on real user queries, and publishes it
//! as index version = model version, with the version metadata generated alongside.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use tandem_data::{EventColumns, EventLog};
use tandem_index::artifact::{publish, IndexManifest};
use tandem_index::{build, recall_at_k, Engine, Exact, HnswParams};
use tandem_model::{TwoTower, UserRequest};

use crate::args::{model_dir, print_json};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model version directory (ARTIFACTS/models/<name>/<version>).
    #[arg(long)]
    pub model: PathBuf,
    /// Artifact store root; the index goes to <out>/indexes/<name>/<version>.
    #[arg(long, env = "TANDEM_ARTIFACTS", default_value = "artifacts")]
    pub out: PathBuf,
    /// Events whose users' histories make the recall queries (default: stored user profiles
    /// with empty histories).
    #[arg(long)]
    pub events: Option<PathBuf>,
    /// Recall queries to sample.
    #[arg(long, default_value_t = 1000)]
    pub recall_queries: usize,
    /// tandem or instant-distance.
    #[arg(long, default_value = "tandem")]
    pub engine: Engine,
    #[arg(long, default_value_t = HnswParams::default().m)]
    pub m: usize,
    #[arg(long, default_value_t = HnswParams::default().ef_construction)]
    pub ef_construction: usize,
    /// Default search ef of the index.
    #[arg(long, default_value_t = HnswParams::default().ef_search)]
    pub ef_search: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let dir = model_dir(&a.model)?;
    let manifest = tandem_model::model::open(dir)?;
    let model = TwoTower::load(dir)?;
    let started = Instant::now();
    let all = model.item.embed_all()?;
    let dim = all.dim(1)?;
    // Row 0 is the out-of-vocabulary item: never a search result.
    let vectors: Vec<f32> = all
        .narrow(0, 1, all.dim(0)? - 1)?
        .flatten_all()?
        .to_vec1()?;
    let items: Vec<String> = model.item.items.ids[1..].to_vec();
    let embed_seconds = started.elapsed().as_secs_f64();
    if items.is_empty() {
        anyhow::bail!("{}: the model has no items", dir.display());
    }
    let params = HnswParams {
        engine: a.engine,
        m: a.m,
        ef_construction: a.ef_construction,
        ef_search: a.ef_search,
        ..Default::default()
    };
    let t = Instant::now();
    let index = build(vectors.clone(), dim, &params)?;
    let build_seconds = t.elapsed().as_secs_f64();

    let (queries, source) = recall_queries(&model, a.events.as_ref(), a.recall_queries)?;
    let truth = Exact { dim, vectors }.ground_truth(&queries, 10);
    let recall = recall_at_k(index.as_ref(), &queries, &truth, 10, index.default_ef());
    let hash = tandem_artifact::sha256_hex(&index.to_bytes());
    let meta = IndexManifest {
        versions: BTreeMap::from([(manifest.name.clone(), manifest.version)]),
        index_id: format!("{}-{}-{}", manifest.name, manifest.version, &hash[..12]),
        model_name: manifest.name.clone(),
        model_version: manifest.version,
        item_count: items.len() as u64,
        dim,
        params,
        build_seconds,
        ann_recall_at_10: recall,
        recall_queries: truth.len(),
        recall_query_source: source,
        feature_schema_hash: manifest.meta.feature_schema_hash.clone(),
    };
    let published = publish(&a.out, index.as_ref(), &items, &meta)?;
    let out = serde_json::json!({
        "dir": published.dir,
        "index_id": meta.index_id,
        "versions": meta.versions,
        "items": meta.item_count,
        "dim": dim,
        "embed_seconds": embed_seconds,
        "build_seconds": build_seconds,
        "ann_recall_at_10": recall,
        "recall_queries": meta.recall_queries,
        "recall_query_source": meta.recall_query_source,
    });
    if a.json {
        return print_json(&out);
    }
    println!(
        "published index {} ({} items, built in {:.1}s, ANN recall@10 {:.4} on {} queries) → {}",
        meta.index_id,
        meta.item_count,
        build_seconds,
        recall,
        meta.recall_queries,
        published.dir.display()
    );
    Ok(())
}

/// User embeddings to measure recall with: users' real histories from `events` when given,
/// otherwise stored profiles with empty histories.
fn recall_queries(
    model: &TwoTower,
    events: Option<&PathBuf>,
    n: usize,
) -> Result<(Vec<f32>, String)> {
    let n = n.max(1);
    match events {
        Some(path) => {
            let log = EventLog::read(path, &EventColumns::default())?;
            let (hist, last) = model.user.histories(&log);
            let step = (log.users.len() / n).max(1);
            let reqs: Vec<UserRequest> = (0..log.users.len())
                .step_by(step)
                .take(n)
                .map(|u| UserRequest {
                    user: log.users.name(u as u32),
                    history: hist[u].iter().rev().copied().collect(),
                    ts: last[u],
                    features: None,
                })
                .collect();
            let q = embed_chunks(model, &reqs)?;
            Ok((
                q,
                format!("histories of {} users in {}", reqs.len(), path.display()),
            ))
        }
        None => {
            let users = &model.user.users.ids;
            let step = (users.len() / n).max(1);
            let reqs: Vec<UserRequest> = users
                .iter()
                .step_by(step)
                .take(n)
                .map(|u| UserRequest {
                    user: u,
                    history: Vec::new(),
                    ts: 0,
                    features: None,
                })
                .collect();
            let q = embed_chunks(model, &reqs)?;
            Ok((
                q,
                format!("profiles of {} users (no histories given)", reqs.len()),
            ))
        }
    }
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
