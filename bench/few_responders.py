"""How often `experiment.stats.compare_ratio` alone calls an A/A test when few users give all the feedback.

200 users an arm, of whom only k give feedback (20-30 thumbs each; 50-60 when k = 1, so that every run has the
50 signals an arm the default policy asks for), each responder with their own taste (Beta(2, 2)). A "promote"
is the always-valid interval's lower end above 0, the decision rule's test; nominal at most 2.5% one-sided.
compare_ratio refuses (None) an arm with fewer than 2 responders; the decision rule also asks for
`Policy.min_responders_per_arm` (20) of them, which this script does not apply: it measures the statistics.

    .venv/bin/python bench/few_responders.py            # 4,000 runs per k, about 20 s
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from experiment import stats  # noqa: E402

USERS, RUNS, SEED = 200, 4000, 3


def _arm(rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
    num, den = np.zeros(USERS), np.zeros(USERS)
    den[:k] = rng.integers(max(20, 50 // k), max(31, 50 // k + 11), k)
    num[:k] = rng.binomial(den[:k].astype(int), rng.beta(2, 2, k))
    return num, den


def main() -> None:
    rng = np.random.default_rng(SEED)
    print("| responders an arm | runs with >= 50 signals an arm | refused (None) | false promote | "
          "std_error < 1e-12 |\n|---:|---:|---:|---:|---:|")
    for k in (1, 2, 3, 5, 10, 20):
        valid = refused = promoted = degenerate = 0
        for _ in range(RUNS):
            (num_a, den_a), (num_b, den_b) = _arm(rng, k), _arm(rng, k)
            if min(den_a.sum(), den_b.sum()) < 50:
                continue
            valid += 1
            comparison = stats.compare_ratio(num_a, den_a, num_b, den_b)
            if comparison is None:
                refused += 1
                continue
            promoted += comparison.sequential_ci[0] > 0
            degenerate += comparison.std_error < 1e-12
        print(f"| {k} | {valid} | {refused} | {promoted / valid:.1%} | {degenerate} |")


if __name__ == "__main__":
    main()
