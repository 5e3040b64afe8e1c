"""HNSW's efSearch on large indexes: recall@k against the exact (flat) index, and one query's latency.

The index is retrieval.index.VectorIndex with `kind="hnsw"` as the project builds it (M 32, efConstruction 200;
a search asks efSearch max(64, k)). The vectors are SYNTHETIC, not a corpus: unit vectors of the embedder's
dimension (384) drawn around --clusters random centres at about the spread of sentence embeddings (a point's
cosine to its centre is about 0.7), queries drawn the same way. Recall depends on the data; this measures how it
moves with efSearch and the index's size, not what a given corpus will get.

Each query is searched alone, as the proxy searches (one request, one query), on one faiss thread; the last
two rows per size are the project's own call (`VectorIndex.search`, Python included) on the HNSW index and
on the flat one.

    .venv/bin/python bench/hnsw_search.py [--sizes 20000,100000] [--queries 400] [--ef 16,32,64,128,256]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.index import _HNSW_EF_SEARCH, Chunk, VectorIndex  # noqa: E402

DIM = 384  # all-MiniLM-L6-v2's


def clustered_unit_vectors(n: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`n` unit vectors, each near one of `centres` (cosine about 0.7 to it)."""
    spread = np.sqrt(1.04 / centres.shape[1])  # |noise| ~ spread * sqrt(dim): cos = 1 / sqrt(1 + 1.04) ~ 0.7
    picks = rng.integers(0, len(centres), size=n)
    vectors = centres[picks] + rng.normal(0.0, spread, size=(n, centres.shape[1]))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top k that the search returned."""
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)]))


def _one_at_a_time(search, queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    labels, micros = [], []
    for query in queries:
        started = time.perf_counter()
        labels.append(search(query.reshape(1, -1)))
        micros.append((time.perf_counter() - started) * 1e6)
    return np.array(labels), micros


def measure(size: int, args: argparse.Namespace, rng: np.random.Generator) -> list[str]:
    import faiss

    centres = rng.normal(size=(args.clusters, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = clustered_unit_vectors(size, centres, rng)
    queries = clustered_unit_vectors(args.queries, centres, rng)
    chunks = [Chunk(id=str(i), title="", source="synthetic", text="") for i in range(size)]
    flat = VectorIndex.build(chunks, vectors, kind="flat")
    started = time.perf_counter()
    hnsw = VectorIndex.build(chunks, vectors, kind="hnsw")
    build_s = time.perf_counter() - started
    threads = faiss.omp_get_max_threads()  # the build's; the searches run on one, as the proxy's do
    faiss.omp_set_num_threads(1)
    try:
        return _search_rows(size, build_s, args, flat, hnsw, queries)
    finally:
        faiss.omp_set_num_threads(threads)


def _search_rows(size: int, build_s: float, args: argparse.Namespace, flat: VectorIndex, hnsw: VectorIndex,
                 queries: np.ndarray) -> list[str]:  # fmt: skip
    import faiss

    k = args.k
    _scores, exact = flat._index.search(queries, k)
    rows = []
    for ef in args.ef:
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(ef, k)
        found, micros = _one_at_a_time(lambda q, p=params: hnsw._index.search(q, k, params=p)[1][0], queries)
        rows.append(_row(size, build_s, f"faiss, efSearch {params.efSearch}", recall_at_k(found, exact), micros))

    def ids(index: VectorIndex):
        return lambda q: [int(hit.id) for hit in index.search(q[0], top_k=k)]

    for name, index in ((f"VectorIndex.search, hnsw (efSearch {max(_HNSW_EF_SEARCH, k)})", hnsw),
                        ("VectorIndex.search, flat (exact)", flat)):  # fmt: skip
        found, micros = _one_at_a_time(ids(index), queries)
        rows.append(_row(size, build_s, name, recall_at_k(found, exact), micros))
    return rows


def _row(size: int, build_s: float, search: str, recall: float, micros: list[float]) -> str:
    p50, p95 = np.percentile(micros, [50, 95])
    return f"| {size:,} | {build_s:.1f} | {search} | {recall:.3f} | {p50:,.0f} | {p95:,.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20000,100000")
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--ef", default="16,32,64,128,256")
    parser.add_argument("--k", type=int, default=5, help="neighbours per query (the search API's default top_k)")
    parser.add_argument("--clusters", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.ef = [int(e) for e in args.ef.split(",")]
    rng = np.random.default_rng(args.seed)
    print(f"`python bench/hnsw_search.py --sizes {args.sizes} --queries {args.queries} --ef "
          f"{','.join(map(str, args.ef))} --k {args.k}`, Python {platform.python_version()}, {os.cpu_count()} CPUs; "
          f"SYNTHETIC clustered vectors ({args.clusters} centres, dim {DIM}); one query at a time, one faiss thread\n")
    print(f"| vectors | HNSW build s | search | recall@{args.k} vs flat | µs per query, p50 | p95 |")
    print("|---:|---:|---|---:|---:|---:|")
    for size in (int(s) for s in args.sizes.split(",")):
        for row in measure(size, args, rng):
            print(row, flush=True)


if __name__ == "__main__":
    main()
