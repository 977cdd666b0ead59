//! `tandem bench ann`: recall, throughput and latency of an index engine against brute force.

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::{build, recall_at_k, AnnIndex, Exact, HnswParams, IndexError, Result};

/// Reads TEXMEX `.fvecs`: each vector is a little-endian i32 dimension followed by that many f32.
pub fn read_fvecs(path: &Path, limit: Option<usize>) -> Result<(Vec<f32>, usize)> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| IndexError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let bad = |why: &str| IndexError::Invalid(format!("{}: {why}", path.display()));
    if bytes.len() < 4 {
        return Err(bad("empty fvecs file"));
    }
    let dim = i32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
    if dim <= 0 {
        return Err(bad("non-positive dimension"));
    }
    let dim = dim as usize;
    let record = 4 + 4 * dim;
    if !bytes.len().is_multiple_of(record) {
        return Err(bad("size is not a multiple of the record size"));
    }
    let n = (bytes.len() / record).min(limit.unwrap_or(usize::MAX));
    let mut out = Vec::with_capacity(n * dim);
    for r in 0..n {
        let rec = &bytes[r * record..(r + 1) * record];
        if i32::from_le_bytes(rec[..4].try_into().expect("4 bytes")) as usize != dim {
            return Err(bad("vectors of different dimensions"));
        }
        out.extend(
            rec[4..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    Ok((out, dim))
}

/// L2-normalises rows in place (the index assumes unit vectors).
pub fn normalise(v: &mut [f32], dim: usize) {
    for row in v.chunks_exact_mut(dim) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|x| *x /= n);
    }
}

#[derive(Debug, Serialize)]
pub struct EfRow {
    pub ef: usize,
    pub recall_at_10: f64,
    pub qps_1_thread: f64,
    pub qps_all_threads: f64,
    pub threads: usize,
    pub p50_us: f64,
    pub p99_us: f64,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub engine: &'static str,
    /// Inner-product implementation selected for this CPU.
    pub simd: &'static str,
    pub base: usize,
    pub queries: usize,
    pub dim: usize,
    pub params: HnswParams,
    pub build_seconds: f64,
    /// Opening the written index file (what a host does on LoadVersion, after the artifact
    /// checksums): Tandem's HNSW maps it and checks every link.
    pub load_seconds: f64,
    /// A host's whole LoadVersion of the index published as an artifact version: the
    /// manifest, every file's checksums (chunked files on every core), the mapping and its
    /// checks, and the item ids.
    pub artifact_load_seconds: f64,
    /// Of which the checksums.
    pub verify_seconds: f64,
    /// Size of the published version (index file and item ids).
    pub artifact_bytes: u64,
    /// Whether the loaded index serves from a memory-mapped file.
    pub mapped: bool,
    /// What layer 0 is scored on (`auto` resolved at build).
    pub layout: crate::Layout,
    /// Size of the index file per vector, in bytes.
    pub file_bytes_per_vector: f64,
    /// Serving memory per vector (vectors, codes, links), in bytes.
    pub bytes_per_vector: f64,
    /// Code-distance kernel selected for this CPU (int8 layout).
    pub simd_codes: &'static str,
    /// Share of the exact 10 nearest that the index's codes rank among their own 10 nearest
    /// (the index's vectors as queries; absent for engines without codes).
    pub code_fidelity: Option<f64>,
    /// Mean layer-0 links per node (absent for engines that do not say).
    pub links_per_node: Option<f64>,
    pub ground_truth_seconds: f64,
    pub peak_rss_mb: f64,
    /// The pages the searches ran on, read after the timed passes (see [`PageSizes`]).
    pub pages: PageSizes,
    pub rss_after_ground_truth_mb: f64,
    pub rss_after_build_mb: f64,
    pub rows: Vec<EfRow>,
}

pub fn run(
    base: Vec<f32>,
    queries: Vec<f32>,
    dim: usize,
    params: &HnswParams,
    efs: &[usize],
    repeat: usize,
) -> Result<BenchReport> {
    let t = Instant::now();
    let truth = Exact {
        dim,
        vectors: base.clone(),
    }
    .ground_truth(&queries, 10);
    let ground_truth_seconds = t.elapsed().as_secs_f64();
    let rss_after_ground_truth_mb = peak_rss_mb();
    let n = base.len() / dim;
    let t = Instant::now();
    let index = build(base, dim, params)?;
    let build_seconds = t.elapsed().as_secs_f64();
    let rss_after_build_mb = peak_rss_mb();
    let root = std::env::temp_dir().join(format!("tandem-bench-ann-{}", std::process::id()));
    let published = publish_for_bench(&root, index.as_ref(), params, build_seconds);
    drop(index);
    let timed = published.and_then(|dir| time_loads(&dir, params));
    // The mapping keeps the file's pages; the names can go now.
    let _ = std::fs::remove_dir_all(&root);
    let loads = timed?;
    let index = &loads.index;
    let file_bytes_per_vector = loads.file_bytes as f64 / n.max(1) as f64;
    let nq = queries.len() / dim;
    // Throughput without the clock reads: `repeat` rounds, each one pass per ef in turn, and
    // the fastest pass per ef. Rounds rather than an ef's passes back to back, so a slow spell
    // of the machine (seconds long on a shared VM) costs every ef one pass, not one ef all.
    let mut best = vec![f64::INFINITY; efs.len()];
    for _ in 0..repeat.max(1) {
        for (b, &ef) in best.iter_mut().zip(efs) {
            let t = Instant::now();
            for q in queries.chunks_exact(dim) {
                std::hint::black_box(index.search(q, 10, ef));
            }
            *b = b.min(t.elapsed().as_secs_f64());
        }
    }
    let mut rows = Vec::new();
    for (&ef, best) in efs.iter().zip(best) {
        let recall = recall_at_k(index.as_ref(), &queries, &truth, 10, ef);
        let mut lat: Vec<f64> = Vec::with_capacity(nq);
        for q in queries.chunks_exact(dim) {
            let s = Instant::now();
            std::hint::black_box(index.search(q, 10, ef));
            lat.push(s.elapsed().as_secs_f64() * 1e6);
        }
        let t = Instant::now();
        queries.par_chunks(dim).for_each(|q| {
            std::hint::black_box(index.search(q, 10, ef));
        });
        let qps_all = nq as f64 / t.elapsed().as_secs_f64();
        let [p50, p99] = tandem_types::stats::percentiles(&mut lat, [0.5, 0.99]);
        rows.push(EfRow {
            ef,
            recall_at_10: recall,
            qps_1_thread: nq as f64 / best,
            qps_all_threads: qps_all,
            threads: rayon::current_num_threads(),
            p50_us: p50,
            p99_us: p99,
        });
    }
    Ok(BenchReport {
        engine: index.engine(),
        simd: crate::simd::selected_name(),
        base: n,
        queries: nq,
        dim,
        params: params.clone(),
        build_seconds,
        load_seconds: loads.load_seconds,
        artifact_load_seconds: loads.artifact_load_seconds,
        verify_seconds: loads.verify_seconds,
        artifact_bytes: loads.artifact_bytes,
        mapped: index.is_mapped(),
        layout: index.layout(),
        file_bytes_per_vector,
        bytes_per_vector: index.bytes_per_vector(),
        simd_codes: crate::simd::selected_u8_name(),
        code_fidelity: index.code_fidelity(),
        links_per_node: index.links_per_node(),
        ground_truth_seconds,
        peak_rss_mb: peak_rss_mb(),
        pages: PageSizes::now(),
        rss_after_ground_truth_mb,
        rss_after_build_mb,
        rows,
    })
}

/// Publishes `index` (items named `i0`, `i1`, …) as version 1 of a series under `root`.
fn publish_for_bench(
    root: &std::path::Path,
    index: &dyn AnnIndex,
    params: &HnswParams,
    build_seconds: f64,
) -> Result<std::path::PathBuf> {
    use crate::artifact::{publish, IndexManifest};
    let v = tandem_types::ModelVersion(1);
    let items: Vec<String> = (0..index.len()).map(|i| format!("i{i}")).collect();
    let meta = IndexManifest {
        versions: [("bench".to_string(), v)].into(),
        index_id: "bench-v1".into(),
        model_name: "bench".into(),
        model_version: v,
        item_count: items.len() as u64,
        dim: index.dim(),
        params: params.clone(),
        build_seconds,
        ann_recall_at_10: 0.0,
        recall_queries: 0,
        recall_query_source: "bench".into(),
        feature_schema_hash: String::new(),
        shards: 0,
        shard_items: Vec::new(),
    };
    Ok(publish(root, index, &items, &meta)?.dir)
}

struct Loads {
    index: Box<dyn AnnIndex>,
    load_seconds: f64,
    artifact_load_seconds: f64,
    verify_seconds: f64,
    file_bytes: u64,
    artifact_bytes: u64,
}

/// Times a host's load of the published version `dir`, then (pages now cached, as for the
/// host) the index file's open alone, which is the index the bench then searches.
fn time_loads(dir: &std::path::Path, params: &HnswParams) -> Result<Loads> {
    let path = dir.join(crate::artifact::INDEX_FILE);
    let file_bytes = std::fs::metadata(&path)
        .map_err(|source| crate::IndexError::Io {
            path: path.clone(),
            source,
        })?
        .len();
    let t = Instant::now();
    let manifest: tandem_artifact::Manifest<crate::artifact::IndexManifest> =
        tandem_artifact::open(dir)?;
    let verify_seconds = t.elapsed().as_secs_f64();
    let artifact_bytes = manifest.files.values().map(|f| f.bytes).sum();
    let t = Instant::now();
    let loaded = crate::artifact::load(dir)?;
    let artifact_load_seconds = t.elapsed().as_secs_f64();
    drop(loaded);
    let t = Instant::now();
    let index = crate::open_with(&path, params.engine, params.layout)?;
    let load_seconds = t.elapsed().as_secs_f64();
    Ok(Loads {
        index,
        load_seconds,
        artifact_load_seconds,
        verify_seconds,
        file_bytes,
        artifact_bytes,
    })
}

/// How much of this process's memory sits on 2 MiB pages, and the system's transparent huge
/// page mode. A graph walk touches a few hundred scattered rows per query, so its speed depends
/// on the page size (measured: 20 % more single-thread QPS on a 100k-vector index mapped in
/// 2 MiB pages than on the same index on 4 KiB pages); a comparison between engines states
/// what each ran on. Linux only; elsewhere all fields are empty.
#[derive(Debug, Default, Serialize)]
pub struct PageSizes {
    /// The bracketed choice of `/sys/kernel/mm/transparent_hugepage/enabled` (`always`,
    /// `madvise` or `never`).
    pub thp: Option<String>,
    /// File pages mapped by 2 MiB entries (where a mapped index lives).
    pub file_pmd_mapped_mb: Option<f64>,
    /// Anonymous memory on 2 MiB pages (where a heap-loaded index lives).
    pub anon_huge_mb: Option<f64>,
}

impl PageSizes {
    /// This process's, now.
    pub fn now() -> PageSizes {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        PageSizes::parse(
            &read("/sys/kernel/mm/transparent_hugepage/enabled"),
            &read("/proc/self/smaps_rollup"),
        )
    }

    /// From the texts of the THP `enabled` file and of `/proc/<pid>/smaps_rollup`.
    fn parse(enabled: &str, rollup: &str) -> PageSizes {
        let thp = enabled
            .split_once('[')
            .and_then(|(_, rest)| rest.split_once(']'))
            .map(|(mode, _)| mode.to_string());
        PageSizes {
            thp,
            file_pmd_mapped_mb: proc_field_mb(rollup, "FilePmdMapped"),
            anon_huge_mb: proc_field_mb(rollup, "AnonHugePages"),
        }
    }
}

/// The value of a `Key:   1234 kB` line of a `/proc` text, in MB.
fn proc_field_mb(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
}

/// Peak resident set size of this process (Linux `VmHWM`), 0 elsewhere.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| proc_field_mb(&s, "VmHWM"))
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_are_read_from_the_kernel_texts() {
        let rollup = "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss:  124352 kB\n\
                      AnonHugePages:  2048 kB\nFilePmdMapped:  45056 kB\n";
        let p = PageSizes::parse("always [madvise] never\n", rollup);
        assert_eq!(p.thp.as_deref(), Some("madvise"));
        assert_eq!(p.file_pmd_mapped_mb, Some(44.0));
        assert_eq!(p.anon_huge_mb, Some(2.0));
        let none = PageSizes::parse("", "Rss: 10 kB\n");
        assert!(none.thp.is_none() && none.file_pmd_mapped_mb.is_none());
    }

    #[test]
    fn fvecs_are_read_and_bad_files_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.fvecs");
        let mut bytes = Vec::new();
        for v in [[1f32, 2.0], [3.0, 4.0]] {
            bytes.extend_from_slice(&2i32.to_le_bytes());
            v.iter()
                .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
        }
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            read_fvecs(&path, None).unwrap(),
            (vec![1.0, 2.0, 3.0, 4.0], 2)
        );
        assert_eq!(read_fvecs(&path, Some(1)).unwrap().0, vec![1.0, 2.0]);
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(read_fvecs(&path, None).is_err());
    }
}
