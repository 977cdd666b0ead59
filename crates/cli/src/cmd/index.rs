//! `tandem index`: embeds every catalogue item with one model version's item tower, builds the
//! HNSW index, measures its recall against exact search on real user queries, and publishes it
//! as index version = model version, with the version metadata generated alongside.

use std::path::PathBuf;

use anyhow::Result;
use tandem_data::{EventColumns, EventLog};
use tandem_index::{Engine, HnswParams};
use tandem_model::TwoTower;
use tandem_pipeline::{build_and_publish_index, history_queries, profile_queries, Built};
use tandem_types::error_chain;

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
    /// Split the catalogue into this many shards (by a stable hash of the item id), published
    /// together as one version; each ANN host then serves one (`tandem serve ann --shard I`).
    #[arg(long, default_value_t = 1)]
    pub shards: u32,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let dir = model_dir(&a.model)?;
    let params = HnswParams {
        engine: a.engine,
        m: a.m,
        ef_construction: a.ef_construction,
        ef_search: a.ef_search,
        ..Default::default()
    };
    let queries = |model: &TwoTower| match &a.events {
        Some(path) => {
            let log = EventLog::read(path, &EventColumns::default())?;
            let (q, source) = history_queries(model, &log, a.recall_queries)?;
            Ok((q, format!("{source} in {}", path.display())))
        }
        None => profile_queries(model, a.recall_queries),
    };
    if a.shards == 0 {
        anyhow::bail!("--shards must be at least 1");
    }
    let fail = |e: tandem_pipeline::PipelineError| {
        anyhow::anyhow!("{}: {}", dir.display(), error_chain(&e))
    };
    let (built, meta, published) =
        build_and_publish_index(&a.out, dir, &params, queries, a.shards).map_err(fail)?;
    let (embed_seconds, build_seconds) = match &built {
        Built::Whole(b) => (Some(b.embed_seconds), b.build_seconds),
        Built::Sharded(b) => (None, b.build_seconds),
    };
    let out = serde_json::json!({
        "dir": published,
        "index_id": meta.index_id,
        "versions": meta.versions,
        "items": meta.item_count,
        "dim": meta.dim,
        "shards": meta.shard_count(),
        "shard_items": meta.shard_items,
        "embed_seconds": embed_seconds,
        "build_seconds": build_seconds,
        "ann_recall_at_10": meta.ann_recall_at_10,
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
        meta.ann_recall_at_10,
        meta.recall_queries,
        published.display()
    );
    Ok(())
}
