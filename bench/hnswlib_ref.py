#!/usr/bin/env python3
"""hnswlib (its Python package) on exactly the vectors `tandem bench ann --dump DIR` used, for a
side-by-side table. Run by hand (pip install hnswlib numpy), not by CI:

    tandem bench ann --synthetic 200000,64 --intrinsic 24 --dump /tmp/v > tandem.json
    python3 bench/hnswlib_ref.py --dir /tmp/v --m 16 --ef-construction 200 > hnswlib.json

Inner-product space on the (already L2-normalised) vectors, recall@10 against exact search,
single-thread QPS (one knn_query call over every query on one thread: no Python cost per
query), all-thread QPS (the same call on every core), build time with every core, load time and bytes per vector
(the size of the saved index, which is what hnswlib holds in memory). hnswlib's heap is put
on 2 MiB pages (see `--small-pages`), and "pages" reports what each side ran on.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import hnswlib
import numpy as np


def read_fvecs(path):
    raw = np.fromfile(path, dtype=np.int32)
    dim = raw[0]
    return raw.reshape(-1, dim + 1)[:, 1:].copy().view(np.float32), int(dim)


def page_sizes():
    """The system's transparent huge page mode and this process's memory on 2 MiB pages, as
    `tandem bench ann` reports them (hnswlib holds its index on the heap: on 2 MiB pages under
    THP `always`, or when malloc asks for them as this script makes it; a graph walk's speed
    depends on it). Fields stay None where the kernel does not say."""
    out = {"thp": None, "file_pmd_mapped_mb": None, "anon_huge_mb": None}
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            out["thp"] = f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        pass
    fields = {"FilePmdMapped": "file_pmd_mapped_mb", "AnonHugePages": "anon_huge_mb"}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in fields:
                    out[fields[key]] = int(rest.split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        pass
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="folder with base.fvecs and queries.fvecs")
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--ef", default="16,24,32,48,64,96,128,192,256")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of single-thread passes (one per ef each); the fastest per ef is reported")
    ap.add_argument("--small-pages", action="store_true",
                    help="leave hnswlib's heap on the pages the system gives it (by default it is "
                         "put on 2 MiB pages, as Tandem's mapped index file is)")
    args = ap.parse_args()

    # hnswlib keeps its graph on the heap, which gets 2 MiB pages only under THP `always`; a
    # freshly written index file that Tandem maps sits in 2 MiB page-cache folios on recent
    # kernels. Walk speed depends on the page size (measured: 10-20 % either way), so unless
    # told otherwise the reference runs with glibc's malloc asking for huge pages (glibc 2.35+;
    # older ones ignore the tunable, and "pages" in the output says what the run got).
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if not args.small_pages and "glibc.malloc.hugetlb" not in tunables:
        env = dict(os.environ)
        env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, "glibc.malloc.hugetlb=1") if t)
        os.execve(sys.executable, [sys.executable] + sys.argv, env)

    base, dim = read_fvecs(os.path.join(args.dir, "base.fvecs"))
    queries, _ = read_fvecs(os.path.join(args.dir, "queries.fvecs"))
    n, nq = len(base), len(queries)

    t = time.perf_counter()
    truth = np.empty((nq, 10), dtype=np.int64)
    for s in range(0, nq, 256):
        scores = queries[s:s + 256] @ base.T
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        truth[s:s + 256] = top
    gt_seconds = time.perf_counter() - t

    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(max_elements=n, M=args.m, ef_construction=args.ef_construction, random_seed=7)
    index.set_num_threads(args.threads)
    t = time.perf_counter()
    index.add_items(base, np.arange(n))
    build_seconds = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "index.bin")
        index.save_index(path)
        size = os.path.getsize(path)
        t = time.perf_counter()
        loaded = hnswlib.Index(space="ip", dim=dim)
        loaded.load_index(path, max_elements=n)
        load_seconds = time.perf_counter() - t
    index = loaded

    # Single-thread throughput: `repeat` rounds of one pass per ef, the fastest pass per ef
    # (as `tandem bench ann` does: a slow spell of the VM costs every ef one pass). A pass is
    # one knn_query call over all queries on one thread: the loop runs in C++, so no Python
    # overhead per query is charged to hnswlib.
    efs = [int(e) for e in args.ef.split(",")]
    index.set_num_threads(1)
    best = [float("inf")] * len(efs)
    for _ in range(max(1, args.repeat)):
        for i, ef in enumerate(efs):
            index.set_ef(ef)
            t = time.perf_counter()
            index.knn_query(queries, k=10)
            best[i] = min(best[i], time.perf_counter() - t)

    rows = []
    for ef, b in zip(efs, best):
        index.set_ef(ef)
        index.set_num_threads(1)
        labels, _ = index.knn_query(queries, k=10)
        hits = sum(len(set(labels[i]) & set(truth[i])) for i in range(nq))
        # Latencies come from one call per query and do include Python's overhead (a few
        # microseconds); the throughput above does not.
        lat = []
        for q in queries[:1000]:
            s = time.perf_counter()
            index.knn_query(q, k=10)
            lat.append((time.perf_counter() - s) * 1e6)
        index.set_num_threads(args.threads)
        t = time.perf_counter()
        index.knn_query(queries, k=10)
        qps_all = nq / (time.perf_counter() - t)
        lat.sort()
        rows.append({
            "ef": ef,
            "recall_at_10": hits / (nq * 10),
            "qps_1_thread": nq / b,
            "qps_all_threads": qps_all,
            "threads": args.threads,
            "p50_us": lat[len(lat) // 2],
            "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        })
    print(json.dumps({
        "engine": "hnswlib " + getattr(hnswlib, "__version__", "0.8.0"),
        "base": n,
        "queries": nq,
        "dim": dim,
        "m": args.m,
        "ef_construction": args.ef_construction,
        "build_seconds": build_seconds,
        "load_seconds": load_seconds,
        "bytes_per_vector": size / n,
        "ground_truth_seconds": gt_seconds,
        "pages": page_sizes(),
        "malloc_huge_pages": "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", ""),
        "rows": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
