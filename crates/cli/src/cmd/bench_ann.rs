//! `tandem bench ann`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tandem_index::bench::{normalise, read_fvecs, run};
use tandem_index::{synthetic_embeddings, synthetic_vectors, Engine, HnswParams, Layout};

#[derive(clap::Args, Debug)]
pub struct AnnArgs {
    /// Base vectors (TEXMEX .fvecs).
    #[arg(long, requires = "queries")]
    pub base: Option<PathBuf>,
    /// Query vectors (TEXMEX .fvecs).
    #[arg(long)]
    pub queries: Option<PathBuf>,
    /// A trained model's version directory instead: every item's embedding is a base vector;
    /// the queries are users' embeddings from their --events histories, or else --n-queries
    /// evenly spaced items' own embeddings (item-to-item search).
    #[arg(long, conflicts_with = "base")]
    pub model: Option<PathBuf>,
    /// Event log (file or directory) whose users' histories make the --model queries.
    #[arg(long, requires = "model")]
    pub events: Option<PathBuf>,
    /// Clustered normalised synthetic vectors instead of files: `N,DIM`.
    #[arg(long, default_value = "200000,64", conflicts_with = "base")]
    pub synthetic: String,
    /// Noise around cluster centres for --synthetic (0.6: points of a cluster nearly equidistant).
    #[arg(long, default_value_t = 0.6)]
    pub spread: f32,
    /// Generate --synthetic vectors with this intrinsic dimension (the geometry of learned
    /// embeddings) instead of Gaussian clusters.
    #[arg(long)]
    pub intrinsic: Option<usize>,
    /// Queries for --synthetic.
    #[arg(long, default_value_t = 2000)]
    pub n_queries: usize,
    /// tandem or instant-distance.
    #[arg(long, default_value = "tandem")]
    pub engine: Engine,
    /// What Tandem's layer-0 walk scores: int8 (byte codes, the ef candidates re-ranked on
    /// f32), f32, or auto (measured at build: codes when they rank these vectors faithfully).
    #[arg(long, default_value = "auto")]
    pub layout: Layout,
    #[arg(long, default_value_t = HnswParams::default().m)]
    pub m: usize,
    #[arg(long, default_value_t = HnswParams::default().ef_construction)]
    pub ef_construction: usize,
    /// Serve layer-0 lists as the selection heuristic left them, without filling their free
    /// slots with the nearest candidates it set aside (to compare against the filled default).
    #[arg(long)]
    pub no_fill: bool,
    /// Search ef values, one JSON row each. Values below 10 (the answer's k) narrow Tandem's
    /// walk and still answer 10 rows (hnswlib raises such an ef to k).
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256")]
    pub ef: Vec<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Rounds of single-thread passes over the queries, one pass per ef in each round; the
    /// fastest pass per ef is reported (a shared or virtual machine's speed drifts).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Also write the base and query vectors used as `base.fvecs` / `queries.fvecs` here (to run
    /// another engine on exactly the same data).
    #[arg(long)]
    pub dump: Option<PathBuf>,
    /// Output is always JSON; accepted for symmetry with other commands.
    #[arg(long)]
    pub json: bool,
}

pub fn run_ann(a: AnnArgs) -> Result<()> {
    let (base, queries, dim) = match (&a.model, &a.base, &a.queries) {
        (Some(dir), _, _) => {
            let model = tandem_model::TwoTower::load(crate::args::model_dir(dir)?)?;
            let (base, dim, _) = tandem_pipeline::index::item_vectors(&model)?;
            let (queries, source) = match &a.events {
                Some(path) => {
                    let log = tandem_data::EventLog::read(path, &Default::default())?;
                    tandem_pipeline::index::history_queries(&model, &log, a.n_queries)?
                }
                None => {
                    let n = base.len() / dim;
                    let step = (n / a.n_queries.max(1)).max(1);
                    let q: Vec<f32> = base
                        .chunks_exact(dim)
                        .step_by(step)
                        .take(a.n_queries)
                        .flatten()
                        .copied()
                        .collect();
                    let source = format!("{} items' embeddings", q.len() / dim);
                    (q, source)
                }
            };
            eprintln!(
                "{} item embeddings of dimension {dim}; queries: {source}",
                base.len() / dim
            );
            (base, queries, dim)
        }
        (None, Some(b), Some(q)) => {
            let (mut base, dim) = read_fvecs(b, None)?;
            let (mut queries, qdim) = read_fvecs(q, None)?;
            if dim != qdim {
                anyhow::bail!("base has dimension {dim} but queries {qdim}");
            }
            normalise(&mut base, dim);
            normalise(&mut queries, dim);
            (base, queries, dim)
        }
        _ => {
            let (n, dim) = a
                .synthetic
                .split_once(',')
                .and_then(|(n, d)| {
                    Some((
                        n.trim().parse::<usize>().ok()?,
                        d.trim().parse::<usize>().ok()?,
                    ))
                })
                .context("--synthetic takes N,DIM")?;
            if n == 0 || dim == 0 {
                anyhow::bail!("--synthetic N,DIM must be positive");
            }
            if let Some(d) = a.intrinsic {
                let base = synthetic_embeddings(n, dim, d, a.seed, a.seed + 1);
                (
                    base,
                    synthetic_embeddings(a.n_queries, dim, d, a.seed, a.seed + 2),
                    dim,
                )
            } else {
                // Queries come from the same clusters as the base, like user embeddings near items.
                let clusters = (n / 200).max(1);
                (
                    synthetic_vectors(n, dim, clusters, a.spread, a.seed),
                    synthetic_vectors(a.n_queries, dim, clusters, a.spread, a.seed ^ 0xabcdef),
                    dim,
                )
            }
        }
    };
    if let Some(dir) = &a.dump {
        std::fs::create_dir_all(dir)?;
        write_fvecs(&dir.join("base.fvecs"), &base, dim)?;
        write_fvecs(&dir.join("queries.fvecs"), &queries, dim)?;
    }
    let ef_search = *a.ef.iter().find(|&&e| e >= 64).unwrap_or(&64);
    let params = HnswParams {
        engine: a.engine,
        m: a.m,
        ef_construction: a.ef_construction,
        ef_search,
        seed: a.seed,
        layout: a.layout,
        fill: !a.no_fill,
    };
    let report = run(base, queries, dim, &params, &a.ef, a.repeat)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn write_fvecs(path: &std::path::Path, v: &[f32], dim: usize) -> Result<()> {
    let mut bytes = Vec::with_capacity(v.len() * 4 + v.len() / dim * 4);
    for row in v.chunks_exact(dim) {
        bytes.extend_from_slice(&(dim as i32).to_le_bytes());
        row.iter()
            .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
    }
    std::fs::write(path, bytes).with_context(|| path.display().to_string())
}
