"""A ramp whose small first phase has thousands of users but only a handful of candidate responders (A/A).

Ramp 2% -> 50%: 5,000 users first seen in phase 1 (those whose bucket the ramp moves left out, as the analysis
does), 1,500 in phase 2; each user is, with probability 0.03, a heavy responder (40 requests, each with a thumbs,
their own propensity ~ Beta(mean 0.30, sd 0.20)), else makes one request without feedback. Both arms alike.
Each arm has well over 20 responders in all, but phase 1's candidate arm about three, and phases are weighted
by their users. Counts `analyse_collected`'s false decisions (Policy() without CUPED) over 4,000 runs, stratified
by phase as the analysis is and, for reference, the same users pooled into one stratum. From the second audit
of 2026-12-01.

    .venv/bin/python bench/strata_responders.py          # about 40 s
"""

from __future__ import annotations

import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from experiment.analysis import Analysis, analyse_collected  # noqa: E402
from experiment.decision import Policy  # noqa: E402
from experiment.metrics import COLUMNS, ArmUsers, Collected  # noqa: E402
from store.models import Experiment  # noqa: E402

START = datetime(2026, 1, 1, tzinfo=UTC)
RUNS, FIRST, SECOND, SHARES, RESPOND, REQUESTS = 4000, 5000, 1500, (0.02, 0.5), 0.03, 40


def _arm(requests: np.ndarray, thumbs: np.ndarray, ups: np.ndarray, strata: np.ndarray) -> ArmUsers:
    columns = {c: np.zeros(requests.size) for c in COLUMNS}
    columns.update(requests=requests.astype(float), thumbs=thumbs.astype(float), feedback_events=thumbs.astype(float),
                   satisfaction_n=thumbs.astype(float), thumbs_up=ups.astype(float),
                   satisfaction_sum=ups.astype(float))
    latencies = np.random.default_rng(0).lognormal(5, 0.5, int(requests.sum()))
    return ArmUsers([f"u{n}" for n in range(requests.size)], columns, latencies, strata.astype(int),
                    latency_users=np.repeat(np.arange(requests.size), requests.astype(int)))


def one_run(rng: np.random.Generator, stratify: bool) -> Analysis:
    low, high = int(SHARES[0] * 10_000), int(SHARES[1] * 10_000)
    first = rng.integers(0, 10_000, FIRST)
    first = first[~((first >= low) & (first < high))]  # the users the ramp moves: left out
    buckets = np.concatenate([first, rng.integers(0, 10_000, SECOND)])
    strata = np.concatenate([np.zeros(first.size), np.ones(SECOND)])
    candidate = np.where(strata == 0, buckets < low, buckets < high)
    responder = rng.random(buckets.size) < RESPOND
    requests, thumbs = np.where(responder, REQUESTS, 1), np.where(responder, REQUESTS, 0)
    concentration = 0.3 * 0.7 / 0.2**2 - 1
    ups = rng.binomial(thumbs, rng.beta(0.3 * concentration, 0.7 * concentration, buckets.size))
    if not stratify:
        strata = np.zeros(buckets.size)
    arms = {name: _arm(requests[mask], thumbs[mask], ups[mask], strata[mask])
            for name, mask in (("control", ~candidate), ("candidate", candidate))}
    experiment = Experiment(id="sim", candidate_base_url="http://sim", candidate_share=SHARES[1], status="running",
                            primary_metric="satisfaction", started_at=START, salt="x")
    left_out = {0: FIRST - first.size} if stratify else {}
    return analyse_collected(Collected(experiment, arms, [], left_out_by_phase=left_out), Policy(cuped=False))


def main() -> None:
    print("| analysis | not_enough_data | keep_running | promote | roll_back (by a guardrail) | false decisions |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, stratify in (("stratified by phase (the analysis)", True), ("same users, pooled", False)):
        rng = np.random.default_rng(1)
        out, guardrail = Counter(), 0
        for _ in range(RUNS):
            decision = one_run(rng, stratify).decision
            out[decision["action"]] += 1
            guardrail += decision["reason"].startswith("guardrail")
        wrong = out["promote"] + out["roll_back"]
        print(f"| {label} | {out['not_enough_data']} | {out['keep_running']} | {out['promote']} | "
              f"{out['roll_back']} ({guardrail}) | {wrong / RUNS:.2%} |")


if __name__ == "__main__":
    main()
