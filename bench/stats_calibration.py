"""Statistics calibration: how often the decision rule is wrong, on simulated experiments.

Simulates whole experiments user by user (numpy only, no database), looks at them the way the hourly
evaluation does, and counts decisions, for two rules side by side on the same simulated data:

  * project rule  `experiment.analysis.analyse_collected(collected, policy).decision["action"]`, default
                  `Policy()` unless the row says otherwise: by user (delta method), always-valid intervals.
                  With repeated looks a run stops at its first promote or roll_back, as the rollout does.
  * old rule      what main had before (store/arms.py at 45053e9): per request, `experiment.stats.two_proportions`
                  on thumbs-up among thumbs; promote when p < 0.05 and chance to win >= 0.95, roll back when
                  p < 0.05 and chance to win <= 0.05; also as then, at least 100 thumbs per arm and no verdict
                  while the whole-experiment sample-ratio check (all users by serving arm against the current
                  share, p < 0.001) fails. No user clustering, no sequential correction. Its guardrails
                  (error, fallback, p95 latency ratio) are not simulated: the arms are identical there.

Scenarios (each with its own fixed seed; repetition r of a scenario draws from default_rng([seed, r]), so a
--quick run repeats the first 100 repetitions of a full run exactly, whatever --jobs):

  1. A/A, 20 looks         4,000 users at share 0.5, 1 request each with a thumbs (up with p 0.30), a look
                           every 200 users.
  2. A/A, clustered users  400 users at share 0.5, 10 requests each with a thumbs, each user with their own
                           propensity ~ Beta(mean 0.30, sd 0.20); a look every 20 users; default Policy,
                           Policy(min_users_per_arm=20, min_signals_per_arm=20), and that with
                           sequential_tuning=400 (the interval tightest at this sample size). Also the by-user
                           fixed-horizon p-value of the primary metric at the final look (reported by the analysis
                           for reference, never decides): the direct check of the user-level (delta-method)
                           variance, which the always-valid interval's width would otherwise hide at 400 users.
  3. Power, 0.30 -> 0.33   8,000 users at share 0.5 (4,000 per arm expected), 1 request each with a thumbs,
                           candidate up with p 0.33; a look every 400 users.
  4. A/A ramp              a pool of 4,000 returning users (Beta propensities as in 2), 20 periods, each user
                           makes one request with a thumbs in a period with probability 0.1; share 0.1 for
                           periods 1-10, 0.5 for 11-20 (two phases; users assigned by bucket < share, first
                           assignment; as experiment.metrics does, a phase-1 user whose bucket the ramp moves is
                           left out whole, whether or not they come back). Beside it, the rule before 2026-12-01
                           on the same data ("movers' later requests cut": only the returning movers' requests in
                           the other arm excluded). 4b: a drift, every user's propensity +0.05 in the second
                           phase (both arms); 4c: users more active (0.3 per period) and a drift of +0.15.

  5. A/A, few responders   400 users at share 0.5, one request each without feedback, except that each user is,
                           with probability 0.01, a heavy responder: 40 requests with a thumbs each and their own
                           propensity ~ Beta(mean 0.30, sd 0.20); a look every 20 users. About 2 responders and
                           80 thumbs an arm: the minimum signals (50) are met by a handful of users. Policy()
                           asks 20 responders an arm; beside it the same rule with any 2 (as before 2026-12-01,
                           less the one-responder case, which compare_ratio now refuses outright).

  6. A/A, sampled answer   2,000 users at share 0.5, 1 + Poisson(2) requests each, no feedback; the primary metric
     scores, CUPED         is the answer score (`answer_score`), and the scoring flow grades each request with
                           probability 0.15: score = clip(the user's own quality ~ Beta(mean 0.6, sd 0.15) + N(0,
                           0.1)). 70% of the users were in the experiment before, whose answers were sampled the
                           same way: their mean score there is the CUPED covariate (nan for the rest, and for those
                           none of whose earlier answers was scored). A look every 200 users; Policy() against
                           Policy(cuped=False) on the same data. 6p: the same with the candidate's scores +0.04
                           (power); 6b and 6a: every answer scored (before and during), A/A and candidate +0.02.

Latencies are lognormal, identical in both arms, so the latency guardrail runs but has nothing to find;
errors and fallbacks are zero. Scenarios 1-5 have no answer scores and scenarios 6 no feedback.

    .venv/bin/python bench/stats_calibration.py                 # 1,000 repetitions per scenario
    .venv/bin/python bench/stats_calibration.py --quick         # 100 repetitions, a smoke run
    .venv/bin/python bench/stats_calibration.py --reps 2000 --jobs 2 --scenarios 1,3

"seconds" is the CPU time spent inside the rule's own calls for that row (summed over workers; the
simulation itself is not counted); the wall time of each scenario is printed below the table.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property, partial
from pathlib import Path
from typing import Any

# Run as a script from anywhere: the repository root must win over any stale editable-install mapping.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from experiment import stats  # noqa: E402
from experiment.analysis import analyse_collected  # noqa: E402
from experiment.assignment import BUCKETS, candidate_buckets  # noqa: E402
from experiment.decision import PROMOTE, ROLL_BACK, SRM_P, Policy  # noqa: E402
from experiment.metrics import COLUMNS, ArmUsers, Collected, PhaseCount  # noqa: E402
from experiment.phases import Phase  # noqa: E402
from store.models import Experiment  # noqa: E402

START = datetime(2026, 1, 1, tzinfo=UTC)
OLD_ALPHA, OLD_PROMOTE_CHANCE, OLD_ROLLBACK_CHANCE, OLD_MIN_SIGNALS = 0.05, 0.95, 0.05, 100
RELAXED = Policy(min_users_per_arm=20, min_signals_per_arm=20)
RELAXED_TUNED = Policy(min_users_per_arm=20, min_signals_per_arm=20, sequential_tuning=400.0)
ANY_RESPONDERS = Policy(min_responders_per_arm=2)  # the fewest compare_ratio accepts
LATENCY_MU, LATENCY_SIGMA = math.log(800.0), 0.5  # ms: median 800, p95 about 1,800


# --- one look at a simulated experiment -------------------------------------------------------------------------


@dataclass
class Look:
    """What both rules see at one evaluation: the engine's input, and the old rule's per-request counts."""

    collected: Collected
    old_thumbs: tuple[int, int, int, int]  # thumbs up and thumbs, control then candidate, by serving arm
    old_users: tuple[int, int]  # distinct users served by each arm, ever (a moved user counts in both)
    share: float  # the share in force (the old sample-ratio check compared everything against it)
    collected_cut: Collected | None = None  # ramps: the same users with the movers' later requests cut instead

    @property
    def users(self) -> int:
        return sum(arm.users for arm in self.collected.arms.values())

    @cached_property
    def old_srm_alarm(self) -> bool:
        """The old whole-experiment sample-ratio check (store/arms.py sample_ratio_check) fails."""
        observed = list(self.old_users)
        p_value = stats.sample_ratio(observed, [1 - self.share, self.share]) if sum(observed) else None
        return p_value is not None and p_value < SRM_P


def _experiment(share: float) -> Experiment:
    return Experiment(id="sim", candidate_base_url="http://sim", candidate_share=share, status="running",
                      primary_metric=None, started_at=START, salt="x")


def _single_phase_look(experiment: Experiment, arms: dict[str, ArmUsers], counts: list[int],
                       share: float) -> Look:
    """One look at a single-phase experiment; the old rule's counts are the arms' thumbs."""
    phase = PhaseCount(Phase(0, share, START, None, "sim"), (counts[0], counts[1]))
    old = tuple(int(arms[arm].total(column)) for arm in ("control", "candidate") for column in ("thumbs_up", "thumbs"))
    return Look(Collected(experiment=experiment, arms=arms, phases=[phase]), old, (counts[0], counts[1]), share)


def _arm(ids: np.ndarray, requests: np.ndarray, thumbs_up: np.ndarray, latencies: np.ndarray,
         strata: np.ndarray | None = None, thumbs: np.ndarray | None = None,
         latency_users: np.ndarray | None = None) -> ArmUsers:
    """Per-user sums, by default with thumbs on every request: satisfaction of a thumbs is 1 (up) or 0 (down).

    `strata`: each user's phase of first assignment (all 0 in a single-phase experiment). `latency_users`: per
    latency, the index of its user in `ids` (the p95's clusters, as experiment.metrics records them).
    """
    requests, thumbs_up = requests.astype(float), thumbs_up.astype(float)
    thumbs = requests if thumbs is None else thumbs.astype(float)
    columns = {c: np.zeros(ids.size) for c in COLUMNS}
    columns.update(requests=requests, thumbs=thumbs, feedback_events=thumbs, satisfaction_n=thumbs,
                   thumbs_up=thumbs_up, satisfaction_sum=thumbs_up)
    strata = np.zeros(ids.size, dtype=int) if strata is None else strata
    return ArmUsers(user_ids=ids.tolist(), columns=columns, latencies_ms=latencies, strata=strata,
                    latency_users=latency_users)


def _propensities(rng: np.random.Generator, mean: float, sd: float | None, n: int) -> np.ndarray:
    if sd is None:
        return np.full(n, mean)
    concentration = mean * (1 - mean) / sd**2 - 1  # Beta(a, b): var = m (1 - m) / (a + b + 1)
    return rng.beta(mean * concentration, (1 - mean) * concentration, n)


@dataclass(frozen=True)
class Simple:
    """Users arrive one after another, each assigned at `share`, makes `requests` requests, each with a thumbs."""

    users: int
    look_every: int
    requests: int = 1
    control_p: float = 0.30
    candidate_p: float = 0.30
    sd: float | None = None  # per-user propensity spread (Beta); None: every user has the arm's p
    share: float = 0.5

    def looks(self, rng: np.random.Generator) -> Iterator[Look]:
        n, m = self.users, self.requests
        candidate = rng.random(n) < self.share
        p = np.where(candidate, _propensities(rng, self.candidate_p, self.sd, n),
                     _propensities(rng, self.control_p, self.sd, n))
        ups = rng.binomial(m, p)
        latencies = rng.lognormal(LATENCY_MU, LATENCY_SIGMA, (n, m))
        ids = np.array([f"u{i}" for i in range(n)])
        requests = np.full(n, m)
        experiment = _experiment(self.share)
        for end in range(self.look_every, n + 1, self.look_every):
            arms, counts = {}, []
            for name, mask in (("control", ~candidate[:end]), ("candidate", candidate[:end])):
                arms[name] = _arm(ids[:end][mask], requests[:end][mask], ups[:end][mask],
                                  latencies[:end][mask].ravel(), latency_users=np.repeat(np.arange(mask.sum()), m))
                counts.append(int(mask.sum()))
            yield _single_phase_look(experiment, arms, counts, self.share)


@dataclass(frozen=True)
class FewResponders:
    """Users arrive at `share`, one request each, no feedback; a few (each with probability `respond`) make
    `requests` requests with a thumbs each instead, every one with their own propensity (Beta, mean p, sd)."""

    users: int = 400
    look_every: int = 20
    respond: float = 0.01
    requests: int = 40
    p: float = 0.30
    sd: float = 0.20
    share: float = 0.5

    def looks(self, rng: np.random.Generator) -> Iterator[Look]:
        n = self.users
        candidate = rng.random(n) < self.share
        responder = rng.random(n) < self.respond
        requests = np.where(responder, self.requests, 1)
        thumbs = np.where(responder, self.requests, 0)
        ups = rng.binomial(thumbs, _propensities(rng, self.p, self.sd, n))
        latencies = [rng.lognormal(LATENCY_MU, LATENCY_SIGMA, r) for r in requests]
        ids = np.array([f"u{i}" for i in range(n)])
        experiment = _experiment(self.share)
        for end in range(self.look_every, n + 1, self.look_every):
            arms, counts = {}, []
            for name, mask in (("control", ~candidate[:end]), ("candidate", candidate[:end])):
                chosen = np.flatnonzero(mask)
                arms[name] = _arm(ids[chosen], requests[chosen], ups[chosen],
                                  np.concatenate([latencies[i] for i in chosen]) if chosen.size else np.zeros(0),
                                  thumbs=thumbs[chosen],
                                  latency_users=np.repeat(np.arange(chosen.size), requests[chosen]))
                counts.append(int(chosen.size))
            yield _single_phase_look(experiment, arms, counts, self.share)


@dataclass(frozen=True)
class Ramp:
    """Returning users over `periods` periods; the share changes from `shares[0]` to `shares[1]` half-way."""

    pool: int = 4000
    periods: int = 20
    activity: float = 0.1  # chance that a user makes one request (with a thumbs) in a period
    shares: tuple[float, float] = (0.1, 0.5)
    p: float = 0.30
    sd: float = 0.20
    drift: float = 0.0  # added to every user's propensity in the second phase, both arms

    def looks(self, rng: np.random.Generator) -> Iterator[Look]:
        n = self.pool
        bucket = rng.integers(0, BUCKETS, n)  # experiment.assignment: candidate iff bucket < share * BUCKETS
        base = _propensities(rng, self.p, self.sd, n)
        ids = np.array([f"u{i}" for i in range(n)])
        home = np.full(n, -1)  # first arm: -1 none yet, 0 control, 1 candidate
        first = np.full(n, -1)  # phase of first request, as experiment.metrics records it
        cuts = [candidate_buckets(share) for share in self.shares]
        # experiment.metrics: a user first seen in phase k is compared only if no later share moves their bucket.
        movable = [(min(cuts[k:]) <= bucket) & (bucket < max(cuts[k:])) for k in range(len(cuts))]
        requests, ups = np.zeros(n, dtype=int), np.zeros(n, dtype=int)
        cut_requests, cut_ups = np.zeros(n, dtype=int), np.zeros(n, dtype=int)  # the movers' later requests cut
        latencies: list[list[np.ndarray]] = [[], []]
        cut_latencies: list[list[np.ndarray]] = [[], []]
        latency_users: list[list[np.ndarray]] = [[], []]  # the pool index of each latency's user
        cut_latency_users: list[list[np.ndarray]] = [[], []]
        old_thumbs = np.zeros((2, 2), dtype=int)  # [arm] -> (up, thumbs), by serving arm
        old_seen = np.zeros((2, n), dtype=bool)  # [arm] -> users ever served by it
        half = self.periods // 2
        crossed, excluded = np.zeros(n, dtype=bool), 0
        changed = START + timedelta(days=half)
        for period in range(self.periods):
            phase = int(period >= half)
            share = self.shares[phase]
            active = rng.random(n) < self.activity
            served = (bucket < candidate_buckets(share)).astype(int)
            p = np.clip(base + (self.drift if phase else 0.0), 0.0, 1.0)
            up = rng.random(n) < p
            latency = rng.lognormal(LATENCY_MU, LATENCY_SIGMA, n)
            home = np.where(active & (home < 0), served, home)
            first = np.where(active & (first < 0), phase, first)
            cut_counted = active & (served == home)
            moved = active & (served != home)
            crossed |= moved
            excluded += int(moved.sum())
            cut_requests += cut_counted
            cut_ups += cut_counted & up
            left_out = np.where(first == 0, movable[0], movable[-1])
            counted = active & ~left_out
            requests += counted
            ups += counted & up
            for arm in (0, 1):
                latencies[arm].append(latency[counted & (home == arm)])
                latency_users[arm].append(np.flatnonzero(counted & (home == arm)))
                cut_latencies[arm].append(latency[cut_counted & (home == arm)])
                cut_latency_users[arm].append(np.flatnonzero(cut_counted & (home == arm)))
                by_arm = active & (served == arm)
                old_thumbs[arm] += (int((by_arm & up).sum()), int(by_arm.sum()))
                old_seen[arm] |= by_arm
            phases = []
            for index in range(phase + 1):  # as experiment.collect counts: the users first seen in the phase
                new = first == index
                phases.append(PhaseCount(
                    Phase(index, self.shares[index], START if index == 0 else changed,
                          changed if index < phase else None, "start" if index == 0 else "share"),
                    (int((new & (home == 0)).sum()), int((new & (home == 1)).sum()))))
            arms, cut_arms = {}, {}
            for arm, name in enumerate(("control", "candidate")):
                mask = home == arm
                kept = mask & ~left_out
                arms[name] = _arm(ids[kept], requests[kept], ups[kept], np.concatenate(latencies[arm]), first[kept],
                                  latency_users=_positions(kept, np.concatenate(latency_users[arm])))
                cut_arms[name] = _arm(ids[mask], cut_requests[mask], cut_ups[mask],
                                      np.concatenate(cut_latencies[arm]), first[mask],
                                      latency_users=_positions(mask, np.concatenate(cut_latency_users[arm])))
            collected = Collected(experiment=_experiment(share), arms=arms, phases=phases,
                                  crossovers=int(crossed.sum()),
                                  left_out_by_phase={0: int((left_out & (home >= 0)).sum())})  # phase 1 moves none
            cut = Collected(experiment=_experiment(share), arms=cut_arms, phases=phases,
                            crossovers=int(crossed.sum()), excluded_requests=excluded)
            old = (int(old_thumbs[0, 0]), int(old_thumbs[0, 1]), int(old_thumbs[1, 0]), int(old_thumbs[1, 1]))
            yield Look(collected, old, (int(old_seen[0].sum()), int(old_seen[1].sum())), share, cut)


@dataclass(frozen=True)
class SampledScores:
    """Users arrive at `share`; a sample of their answers is scored (the primary), and so was a sample of their
    answers in the experiment before (the CUPED covariate)."""

    users: int = 2000
    look_every: int = 200
    extra_requests: float = 2.0  # requests = 1 + Poisson(this)
    scored: float = 0.15  # chance that an answer is scored
    quality: float = 0.6
    quality_sd: float = 0.15
    noise: float = 0.1
    lift: float = 0.0  # added to the candidate's scores
    returning: float = 0.7  # share of the users who were in the experiment before
    share: float = 0.5

    def _scores(self, rng: np.random.Generator, quality: np.ndarray, requests: np.ndarray,
                lift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per user: the sum and the count of their scored answers."""
        scored = rng.binomial(requests, self.scored)
        owner = np.repeat(np.arange(quality.size), scored)
        values = np.clip(quality[owner] + lift[owner] + rng.normal(0.0, self.noise, owner.size), 0.0, 1.0)
        return np.bincount(owner, weights=values, minlength=quality.size), scored.astype(float)

    def looks(self, rng: np.random.Generator) -> Iterator[Look]:
        n = self.users
        candidate = rng.random(n) < self.share
        quality = _propensities(rng, self.quality, self.quality_sd, n)
        requests = 1 + rng.poisson(self.extra_requests, n)
        score_sum, score_n = self._scores(rng, quality, requests, np.where(candidate, self.lift, 0.0))
        before = np.where(rng.random(n) < self.returning, 1 + rng.poisson(self.extra_requests, n), 0)
        pre_sum, pre_n = self._scores(rng, quality, before, np.zeros(n))
        pre = np.full(n, np.nan)
        np.divide(pre_sum, pre_n, out=pre, where=pre_n > 0)
        latencies = [rng.lognormal(LATENCY_MU, LATENCY_SIGMA, r) for r in requests]
        ids = np.array([f"u{i}" for i in range(n)])
        experiment = _experiment(self.share)
        experiment.primary_metric = "answer_score"
        no_feedback = np.zeros(n)
        for end in range(self.look_every, n + 1, self.look_every):
            arms, counts = {}, []
            for name, mask in (("control", ~candidate[:end]), ("candidate", candidate[:end])):
                chosen = np.flatnonzero(mask)
                arm = _arm(ids[chosen], requests[chosen], no_feedback[chosen], np.concatenate(
                    [latencies[i] for i in chosen]), thumbs=no_feedback[chosen],
                    latency_users=np.repeat(np.arange(chosen.size), requests[chosen]))
                arm.columns.update(grounding_sum=score_sum[chosen], grounding_n=score_n[chosen])
                arm.pre["answer_score"] = pre[chosen]
                arms[name] = arm
                counts.append(int(chosen.size))
            yield _single_phase_look(experiment, arms, counts, self.share)


def _positions(chosen: np.ndarray, pool_index: np.ndarray) -> np.ndarray:
    """Pool indices of users (all in `chosen`) as their positions among the chosen users."""
    return (np.cumsum(chosen) - 1)[pool_index]


# --- the two rules ------------------------------------------------------------------------------------------------


def old_rule(look: Look) -> str:
    """main before the experiment engine (store/arms.py `_decide`), minus guardrails that cannot trip here."""
    if look.old_srm_alarm:
        return "keep_running"
    x_a, n_a, x_b, n_b = look.old_thumbs
    if min(n_a, n_b) < OLD_MIN_SIGNALS:
        return "not_enough_data"
    thumbs = stats.two_proportions(x_a, n_a, x_b, n_b, OLD_ALPHA)
    if thumbs is None:
        return "not_enough_data"
    if thumbs["p_value"] < OLD_ALPHA and thumbs["chance_to_win"] >= OLD_PROMOTE_CHANCE:
        return PROMOTE
    if thumbs["p_value"] < OLD_ALPHA and thumbs["chance_to_win"] <= OLD_ROLLBACK_CHANCE:
        return ROLL_BACK
    return "keep_running"


@dataclass(frozen=True)
class Row:
    label: str
    # "project", "project-fixed" (the by-user fixed-horizon p-value of the primary), "project-cut" (ramps: the
    # project rule with only the movers' later requests cut, as the analysis did before 2026-12-01), or "old"
    rule: str
    looks: str  # "all": every look, stop at the first promote/roll_back; "final": the last look only
    policy: Policy | None = None
    rate: str = "false decisions"  # what the rate column means: "false decisions", "power", "SRM alarms"
    srm: bool = False  # project rule, all looks: also report sample-ratio alarms at any look (all looks run)


@dataclass(frozen=True)
class Scenario:
    key: str
    name: str
    seed: int
    simulation: Simple | Ramp | FewResponders | SampledScores
    rows: tuple[Row, ...]
    goal: str


def _rows(power: bool = False, relaxed: bool = False, srm: bool = False, cut: bool = False) -> tuple[Row, ...]:
    rate = "power" if power else "false decisions"
    rows = [Row("project rule, Policy(), 20 looks", "project", "all", Policy(), rate, srm)]
    if cut:
        rows += [Row("project rule, Policy(), movers' later requests cut (before 2026-12-01), 20 looks",
                     "project-cut", "all", Policy(), rate),
                 Row("project rule, Policy(), movers' later requests cut (before 2026-12-01), final look only",
                     "project-cut", "final", Policy(), rate)]
    if relaxed:
        rows += [Row("project rule, Policy(min_users_per_arm=20, min_signals_per_arm=20), 20 looks", "project",
                     "all", RELAXED, rate),
                 Row("project rule, Policy(min_users_per_arm=20, min_signals_per_arm=20, sequential_tuning=400), "
                     "20 looks", "project", "all", RELAXED_TUNED, rate)]
    rows.append(Row("project rule, Policy(), final look only", "project", "final", Policy(), rate))
    if relaxed:
        rows += [Row("project rule, Policy(min_users_per_arm=20, min_signals_per_arm=20), final look only",
                     "project", "final", RELAXED, rate),
                 Row("by-user fixed-horizon test of the primary (analysis.primary['fixed_horizon'] p < 0.05; "
                     "a reference figure, not a rule), final look only", "project-fixed", "final", Policy(), rate)]
    rows += [Row("old rule (per request, fixed horizon), 20 looks", "old", "all", rate=rate),
             Row("old rule (per request, fixed horizon), final look only", "old", "final", rate=rate)]
    return tuple(rows)


def _cuped_rows(rate: str) -> tuple[Row, ...]:
    """Policy() beside Policy(cuped=False), over 20 looks and at the final look only."""
    policies = (("Policy()", Policy()), ("Policy(cuped=False)", Policy(cuped=False)))
    return tuple(Row(f"project rule, {label}, {looks}", "project", when, policy, rate)
                 for when, looks in (("all", "20 looks"), ("final", "final look only")) for label, policy in policies)


SCENARIOS = {s.key: s for s in (
    Scenario("1", "A/A, 20 looks", 101, Simple(users=4000, look_every=200), _rows(), "<= 5% false decisions"),
    Scenario("2", "A/A, clustered users", 102, Simple(users=400, look_every=20, requests=10, sd=0.20),
             _rows(relaxed=True), "<= 5% false decisions (project rule)"),
    Scenario("3", "Power, 0.30 -> 0.33", 103, Simple(users=8000, look_every=400, candidate_p=0.33),
             _rows(power=True), "power: fraction promoted"),
    Scenario("4a", "A/A ramp 0.1 -> 0.5", 104, Ramp(), _rows(srm=True, cut=True),
             "<= 5% false decisions; SRM alarms ~0"),
    Scenario("4b", "A/A ramp 0.1 -> 0.5, drift +0.05 in phase 2", 105, Ramp(drift=0.05), _rows(srm=True, cut=True),
             "<= 5% false decisions"),
    Scenario("4c", "A/A ramp 0.1 -> 0.5, returning users (activity 0.3), drift +0.15 in phase 2", 106,
             Ramp(activity=0.3, drift=0.15), _rows(cut=True), "<= 5% false decisions"),
    Scenario("5", "A/A, a few heavy responders", 107, FewResponders(), (
        Row("project rule, Policy(), 20 looks", "project", "all", Policy()),
        Row("project rule, Policy(min_responders_per_arm=2) (any 2 responders an arm), 20 looks",
            "project", "all", ANY_RESPONDERS),
        Row("project rule, Policy(), final look only", "project", "final", Policy()),
        Row("project rule, Policy(min_responders_per_arm=2), final look only", "project", "final", ANY_RESPONDERS),
    ), "<= 5% false decisions"),
    Scenario("6", "A/A, sampled answer scores as the primary, CUPED", 108, SampledScores(),
             _cuped_rows("false decisions"), "<= 5% false decisions"),
    Scenario("6p", "Power, answer score +0.04, sampled, CUPED", 109, SampledScores(lift=0.04),
             _cuped_rows("power"), "power: fraction promoted; CUPED above without"),
    Scenario("6b", "A/A, every answer scored, CUPED", 111, SampledScores(scored=1.0), _cuped_rows("false decisions"),
             "<= 5% false decisions"),
    Scenario("6a", "Power, answer score +0.02, every answer scored, CUPED", 110, SampledScores(lift=0.02, scored=1.0),
             _cuped_rows("power"), "power: fraction promoted; CUPED above without"),
)}


# --- one repetition -----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    action: str | None = None  # the first promote/roll_back, or None
    users: int | None = None  # users (both arms, in the comparison) at that look
    guardrail: bool = False  # the roll back came from a guardrail
    srm_alarm: bool | None = None
    seconds: float = 0.0


def _run_row(row: Row, looks: list[Look]) -> Outcome:
    outcome = Outcome()
    chosen = looks if row.looks == "all" else looks[-1:]
    if row.srm:
        outcome.srm_alarm = False
    for look in chosen:
        started = time.process_time()
        if row.rule in ("project", "project-cut"):
            analysis = analyse_collected(look.collected if row.rule == "project" else look.collected_cut, row.policy)
            action, reason = analysis.decision["action"], analysis.decision["reason"]
            if row.srm:
                outcome.srm_alarm |= bool(analysis.srm["mismatch"])
        elif row.rule == "project-fixed":
            primary, reason = analyse_collected(look.collected, row.policy).primary, ""
            action = None
            if primary is not None and primary["fixed_horizon"]["p_value"] < row.policy.alpha:
                action = PROMOTE if primary["difference"] > 0 else ROLL_BACK
        else:
            action, reason = old_rule(look), ""
        outcome.seconds += time.process_time() - started
        if action in (PROMOTE, ROLL_BACK) and outcome.action is None:
            outcome.action, outcome.users = action, look.users
            outcome.guardrail = reason.startswith("guardrail")
            if not row.srm:
                break
    return outcome


def run_repetition(key: str, rep: int) -> tuple[list[Outcome], bool]:
    scenario = SCENARIOS[key]
    looks = list(scenario.simulation.looks(np.random.default_rng([scenario.seed, rep])))
    old_alarm = any(look.old_srm_alarm for look in looks)
    return [_run_row(row, looks) for row in scenario.rows], old_alarm


# --- report -------------------------------------------------------------------------------------------------------


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Tally:
    reps: int = 0
    hits: int = 0
    promotes: int = 0
    guardrail_roll_backs: int = 0
    users: list[int] = field(default_factory=list)
    srm_alarms: int = 0
    seconds: float = 0.0


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _format_rate(hits: int, reps: int) -> tuple[str, str]:
    low, high = wilson(hits, reps)
    return f"{hits / reps:.1%} ({hits}/{reps})", f"[{low:.1%}, {high:.1%}]"


def report(results: dict[str, tuple[list[Tally], Tally, float]]) -> str:
    head = ["scenario", "rule", "reps", "false decision rate / power", "95% Wilson interval",
            "median users at decision (both arms)", "seconds"]
    lines = [_line(head), _line(["---", "---", "---:", "---:", "---", "---:", "---:"])]
    notes = []
    for key, (tallies, old_srm, _wall) in results.items():
        scenario = SCENARIOS[key]
        for row, tally in zip(scenario.rows, tallies, strict=True):
            hits = tally.promotes if row.rate == "power" else tally.hits
            rate, interval = _format_rate(hits, tally.reps)
            label = f"{'power' if row.rate == 'power' else 'false'}: {rate}"
            if row.rate != "power" and tally.hits:
                label += f"; {tally.promotes} promote, {tally.hits - tally.promotes} roll back"
                if tally.guardrail_roll_backs:
                    label += f" ({tally.guardrail_roll_backs} by a guardrail)"
            median = f"{np.median(tally.users):,.0f}" if row.looks == "all" and tally.users else "—"
            lines.append(_line([scenario.name, row.label, str(tally.reps), label, interval, median,
                                f"{tally.seconds:.1f}"]))
            if row.srm:
                rate, interval = _format_rate(tally.srm_alarms, tally.reps)
                lines.append(_line([scenario.name, "project SRM check (per phase, each phase's share), any of 20 "
                                    "looks", str(tally.reps), f"SRM alarms: {rate}", interval, "—", "(above)"]))
                rate, interval = _format_rate(old_srm.srm_alarms, old_srm.reps)
                lines.append(_line([scenario.name, "old SRM check (all users by serving arm vs current share), any "
                                    "of 20 looks", str(old_srm.reps), f"SRM alarms: {rate}", interval, "—", "—"]))
        notes.append(f"{scenario.name}: goal {scenario.goal}; wall {_wall:.1f} s")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def run_scenario(key: str, reps: int, pool: Any, jobs: int) -> tuple[list[Tally], Tally, float]:
    scenario = SCENARIOS[key]
    tallies = [Tally() for _ in scenario.rows]
    old_srm = Tally()
    started = time.perf_counter()
    work: Callable[[int], tuple[list[Outcome], bool]] = partial(run_repetition, key)
    chunk = max(1, reps // (jobs * 10))
    results = pool.imap_unordered(work, range(reps), chunksize=chunk) if pool else map(work, range(reps))
    for done, (outcomes, old_alarm) in enumerate(results, 1):
        old_srm.reps += 1
        old_srm.srm_alarms += old_alarm
        for tally, outcome in zip(tallies, outcomes, strict=True):
            tally.reps += 1
            tally.seconds += outcome.seconds
            if outcome.action is not None:
                tally.hits += 1
                tally.promotes += outcome.action == PROMOTE
                tally.guardrail_roll_backs += outcome.guardrail
                tally.users.append(outcome.users)
            tally.srm_alarms += bool(outcome.srm_alarm)
        if done % max(1, reps // 10) == 0:
            print(f"  scenario {key}: {done}/{reps} ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
                  flush=True)
    return tallies, old_srm, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=1000, help="repetitions per scenario (default 1000)")
    parser.add_argument("--quick", action="store_true", help="100 repetitions per scenario: a smoke run")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: all CPUs)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {list(SCENARIOS)}")
    args = parser.parse_args()
    reps = 100 if args.quick else args.reps
    keys = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {list(SCENARIOS)}")

    import scipy

    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC; nproc {os.cpu_count()}; jobs {args.jobs}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"host: {platform.platform()}, Python {platform.python_version()}, numpy {np.__version__}, "
          f"scipy {scipy.__version__}")
    print(f"repetitions per scenario: {reps}\n", flush=True)
    started = time.perf_counter()
    results = {}
    if args.jobs > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            for key in keys:
                results[key] = run_scenario(key, reps, pool, args.jobs)
    else:
        for key in keys:
            results[key] = run_scenario(key, reps, None, 1)
    print(report(results))
    cpu = sum(t.seconds for tallies, _old, _wall in results.values() for t in tallies)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s; CPU in the rules {cpu:.0f} s (all workers); "
          f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
