"""The p95 latency guardrail on an A/A test where users are heavy and each has a latency level of their own.

Users are randomised, so a user's requests are not independent draws: taking them as such understates the
variance of the p95 and rolls back candidates that are no slower. Both arms here are the same distribution:
300 users an arm, requests per user Pareto(1.2) + 1 (at most 500), a per-user level lognormal(log 800 ms, 0.6),
each request that level times lognormal(0, 0.3). One look per run, the decision rule's always-valid interval
(alpha 0.05, tuning 5,000) and the default guardrail (candidate's p95 worse by more than 50% of control's).
Two variances side by side on the same runs: requests as independent (the analysis before 2026-12-01) and
clustered by user (gbstats QuantileClusteredStatistic; experiment.stats.quantile_estimate(clusters=...)).

    .venv/bin/python bench/latency_clusters.py            # 10,000 runs, about 15 s
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from experiment import stats  # noqa: E402

USERS, RUNS, SEED, MARGIN = 300, 10_000, 7, 0.5


def _arm(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    requests = np.minimum(rng.pareto(1.2, USERS).astype(int) + 1, 500)
    level = rng.lognormal(math.log(800), 0.6, USERS)
    latencies = np.concatenate([scale * rng.lognormal(0, 0.3, r) for scale, r in zip(level, requests, strict=True)])
    return latencies, np.repeat(np.arange(USERS), requests)


def main() -> None:
    rng = np.random.default_rng(SEED)
    differences: list[float] = []
    tallies = {"independent": [0, 0, []], "clustered by user": [0, 0, []]}  # covers 0, breaches, std errors
    for _ in range(RUNS):
        (control, control_users), (candidate, candidate_users) = _arm(rng), _arm(rng)
        for name, tally in tallies.items():
            clusters = name != "independent"
            a = stats.quantile_estimate(control, 0.95, clusters=control_users if clusters else None)
            b = stats.quantile_estimate(candidate, 0.95, clusters=candidate_users if clusters else None)
            difference, variance = b.value - a.value, a.variance + b.variance
            (low, high), _p = stats.sequential_interval(difference, variance, control.size + candidate.size, 0.05,
                                                        5000.0)
            tally[0] += low <= 0 <= high
            tally[1] += low > MARGIN * a.value
            tally[2].append(math.sqrt(variance))
        differences.append(difference)
    print(f"{RUNS} A/A runs, {USERS} users an arm; the p95 difference's real standard deviation over the runs: "
          f"{np.std(differences):.0f} ms\n")
    print("| variance | mean reported std error (ms) | always-valid 95% interval covers 0 | "
          "false latency guardrail breach (roll back) |\n|---|---:|---:|---:|")
    for name, (covered, breached, errors) in tallies.items():
        print(f"| {name} | {np.mean(errors):.0f} | {covered / RUNS:.1%} | {breached / RUNS:.2%} |")


if __name__ == "__main__":
    main()
