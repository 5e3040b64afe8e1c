"""Density-based selection of training rows (the VectorTrainer idea).

Rows are points on the unit sphere (answer embeddings). Two rows are neighbours when their cosine
similarity is at least `epsilon`; a row's density is its neighbour count. Two kinds of row are
worth training on:

* **dense** — members of large neighbourhoods: the typical, "steady state" answers. Clusters are
  the connected components of the neighbour graph; their most connected members (the centres) are
  taken first, round-robin across clusters so one huge cluster cannot crowd the rest out.
* **rare** — rows outside every large cluster that users rated well (or corrected): the anomalies
  worth learning. Rare rows without a strong rating are likely noise and are dropped.

Each kind is capped at its own `top_k`, and the result reports how many of each were kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

_BLOCK = 1024  # rows per similarity block: bounds memory at _BLOCK * n floats


@dataclass(frozen=True)
class SelectionConfig:
    epsilon: float = 0.8  # cosine similarity at which two answers are neighbours
    min_cluster_size: int = 3  # a component this large (or larger) is a dense cluster
    top_k_dense: int = 2000
    top_k_rare: int = 500
    rare_min_quality: float = 5.0  # a rare row is kept only if rated this well (a correction counts as 5)
    enabled: bool = True

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Selection:
    """Indices into the input rows, in selection order, and what happened to the rest."""

    dense: list[int] = field(default_factory=list)
    rare: list[int] = field(default_factory=list)
    clusters: int = 0
    dropped_dense_over_budget: int = 0
    dropped_rare_low_quality: int = 0
    dropped_rare_over_budget: int = 0

    @property
    def kept(self) -> list[int]:
        return sorted(self.dense + self.rare)

    def counts(self) -> dict[str, int]:
        return {
            "dense_kept": len(self.dense),
            "rare_kept": len(self.rare),
            "clusters": self.clusters,
            "dropped_dense_over_budget": self.dropped_dense_over_budget,
            "dropped_rare_low_quality": self.dropped_rare_low_quality,
            "dropped_rare_over_budget": self.dropped_rare_over_budget,
        }


def select_by_density(embeddings: np.ndarray, quality: Sequence[float], config: SelectionConfig) -> Selection:
    """Choose dense-cluster centres and well-rated rare rows from L2-normalised `embeddings`."""
    n = len(quality)
    if embeddings.shape[0] != n:
        raise ValueError(f"{embeddings.shape[0]} embeddings for {n} rows")
    if not config.enabled:
        return Selection(dense=list(range(n)))
    if n == 0:
        return Selection()
    degree, labels = _neighbour_graph(np.asarray(embeddings, dtype=np.float32), config.epsilon)
    sizes = np.bincount(labels)
    in_cluster = sizes[labels] >= config.min_cluster_size
    selection = Selection(clusters=int(np.count_nonzero(sizes >= config.min_cluster_size)))

    dense_order = _round_robin_centres(np.flatnonzero(in_cluster), degree, labels)
    selection.dense = dense_order[: config.top_k_dense]
    selection.dropped_dense_over_budget = len(dense_order) - len(selection.dense)

    rare = [i for i in np.flatnonzero(~in_cluster).tolist() if quality[i] >= config.rare_min_quality]
    selection.dropped_rare_low_quality = int(np.count_nonzero(~in_cluster)) - len(rare)
    # Best rated first; among equals the loneliest, which the dense rows teach least about.
    rare.sort(key=lambda i: (-quality[i], degree[i], i))
    selection.rare = rare[: config.top_k_rare]
    selection.dropped_rare_over_budget = len(rare) - len(selection.rare)
    return selection


def _neighbour_graph(vectors: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour counts and connected-component labels of the epsilon graph, built block by block."""
    n = len(vectors)
    degree = np.zeros(n, dtype=np.int64)
    parent = np.arange(n)
    for start in range(0, n, _BLOCK):
        sims = vectors[start : start + _BLOCK] @ vectors.T
        adjacent = sims >= epsilon
        rows = np.arange(start, min(start + _BLOCK, n))
        adjacent[rows - start, rows] = False  # a row is not its own neighbour
        degree[rows] = adjacent.sum(axis=1)
        for local, other in zip(*np.nonzero(adjacent), strict=True):
            if start + local < other:
                _union(parent, start + int(local), int(other))
    labels = np.array([_find(parent, i) for i in range(n)])
    _, labels = np.unique(labels, return_inverse=True)
    return degree, labels


def _round_robin_centres(members: np.ndarray, degree: np.ndarray, labels: np.ndarray) -> list[int]:
    """Members ordered so that each cluster's most connected row comes before any cluster's second."""
    by_cluster: dict[int, list[int]] = {}
    for i in sorted(members.tolist(), key=lambda i: (-degree[i], i)):
        by_cluster.setdefault(int(labels[i]), []).append(i)
    queues = sorted(by_cluster.values(), key=lambda q: (-len(q), q[0]))
    order: list[int] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        order.extend(q[rank] for q in queues if rank < len(q))
    return order


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = int(parent[i])
    return i


def _union(parent: np.ndarray, a: int, b: int) -> None:
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)


def greedy_dedupe(vectors: np.ndarray, threshold: float, *, against: np.ndarray | None = None) -> list[int]:
    """Indices of the rows to keep, walking `vectors` in order (best first).

    A row is dropped when its cosine similarity to a row already kept, or to any row of `against`,
    is at least `threshold`. Callers order the rows so the one worth keeping comes first.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    fixed = np.asarray(against, dtype=np.float32) if against is not None and len(against) else None
    kept_rows = np.empty_like(vectors)
    kept: list[int] = []
    for i, vector in enumerate(vectors):
        if fixed is not None and float(np.max(fixed @ vector)) >= threshold:
            continue
        if kept and float(np.max(kept_rows[: len(kept)] @ vector)) >= threshold:
            continue
        kept_rows[len(kept)] = vector
        kept.append(i)
    return kept
