import numpy as np

from training.select import SelectionConfig, greedy_dedupe, select_by_density


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _clusters_and_loners(seed: int = 0) -> tuple[np.ndarray, list[float], dict[str, list[int]]]:
    """Two tight clusters (12 and 6 rows) and 4 loners; the first two loners are well rated."""
    rng = np.random.default_rng(seed)
    dim = 32
    centres = _unit(rng.normal(size=(2, dim)))
    big = centres[0] + 0.05 * rng.normal(size=(12, dim))
    small = centres[1] + 0.05 * rng.normal(size=(6, dim))
    loners = rng.normal(size=(4, dim))
    vectors = _unit(np.concatenate([big, small, loners]))
    quality = [4.0] * 18 + [5.0, 5.0, 4.0, 4.0]
    return vectors, quality, {"big": list(range(12)), "small": list(range(12, 18)), "loners": list(range(18, 22))}


def test_keeps_dense_centres_and_well_rated_rare_rows():
    vectors, quality, groups = _clusters_and_loners()
    config = SelectionConfig(epsilon=0.8, min_cluster_size=3, top_k_dense=4, top_k_rare=5, rare_min_quality=5.0)
    selection = select_by_density(vectors, quality, config)
    # Round robin: two from each cluster, each cluster's most connected first.
    assert len(selection.dense) == 4
    assert sum(i in groups["big"] for i in selection.dense) == 2
    assert sum(i in groups["small"] for i in selection.dense) == 2
    assert sorted(selection.rare) == groups["loners"][:2]
    assert selection.counts() == {
        "dense_kept": 4,
        "rare_kept": 2,
        "clusters": 2,
        "dropped_dense_over_budget": 14,
        "dropped_rare_low_quality": 2,
        "dropped_rare_over_budget": 0,
    }


def test_dense_centre_is_the_most_connected_member():
    vectors, quality, groups = _clusters_and_loners()
    sims = vectors @ vectors.T
    degree = (sims >= 0.8).sum(axis=1) - 1
    selection = select_by_density(vectors, quality, SelectionConfig(epsilon=0.8, top_k_dense=2))
    big_centre = next(i for i in selection.dense if i in groups["big"])
    assert degree[big_centre] == max(degree[i] for i in groups["big"])


def test_top_k_caps_rare_rows_best_first():
    vectors, _, groups = _clusters_and_loners()
    quality = [4.0] * 18 + [5.0, 5.0, 5.0, 5.0]
    selection = select_by_density(vectors, quality, SelectionConfig(epsilon=0.8, top_k_rare=3))
    assert len(selection.rare) == 3 and selection.dropped_rare_over_budget == 1


def test_disabled_keeps_everything():
    vectors, quality, _ = _clusters_and_loners()
    selection = select_by_density(vectors, quality, SelectionConfig(enabled=False))
    assert selection.kept == list(range(len(quality)))


def test_empty_input():
    assert select_by_density(np.zeros((0, 8), np.float32), [], SelectionConfig()).kept == []


def test_greedy_dedupe_keeps_first_of_each_near_duplicate_group():
    a, b = _unit(np.eye(2, 8, dtype=np.float32))
    vectors = np.stack([a, b, _unit((a + 0.01 * b)[None])[0], b])
    assert greedy_dedupe(vectors, 0.95) == [0, 1]
    assert greedy_dedupe(vectors, 0.95, against=a[None]) == [1]
