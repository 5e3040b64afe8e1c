"""One experiment's analysis: per-arm metrics with intervals, per-phase sample-ratio checks,
guardrails, the primary metric's always-valid comparison, and the decision.

`analyse(db, id)` reads the store; `analyse_collected(collected, policy)` is the pure part that the
calibration benchmark (bench/stats_calibration.py) runs on simulated users.
`Analysis.to_dict()` is what `abloop evaluate --json` prints; its keys only grow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from experiment import stats
from experiment.assignment import bucketed_share
from experiment.collect import collect, collect_at
from experiment.decision import (
    NOT_ENOUGH_DATA,
    SRM_P,
    Decision,
    Policy,
    decide,
    guardrail_breached,
)
from experiment.metrics import (
    ARMS,
    DEFAULT_PRIMARY,
    METRICS,
    ArmUsers,
    Collected,
)
from store.db import Database
from store.experiments import get_running
from store.models import utcnow

FIXED_LABEL = "fixed-horizon, per request, for reference only: not valid under repeated looks and not used to decide"
SEQUENTIAL_METHOD = ("asymptotic confidence sequence (Waudby-Smith et al. 2023, eq. 9; as GrowthBook's sequential "
                     "engine), user-level delta-method variances")


@dataclass
class Analysis:
    experiment_id: str | None
    status: str | None
    candidate_share: float | None
    primary_metric: str
    arms: dict[str, dict[str, Any]]
    srm: dict[str, Any]
    thumbs_up: dict[str, Any]
    rating: dict[str, Any]
    guardrails: dict[str, Any]
    decision: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    primary: dict[str, Any] | None = None
    phases: list[dict[str, Any]] = field(default_factory=list)
    assignment: dict[str, Any] = field(default_factory=dict)
    sequential: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    evaluated_at: str = field(default_factory=lambda: utcnow().isoformat())

    def to_dict(self) -> dict[str, Any]:
        return _json_ready(dict(self.__dict__))

    @property
    def action(self) -> str:
        return self.decision["action"]


def _json_ready(value: Any) -> Any:
    """nan and inf are not JSON: they become null."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _json_ready(value.item())
    return value


def empty(reason: str, policy: Policy | None = None) -> Analysis:
    """The analysis of nothing: what `abloop evaluate --json` prints when there is no experiment to analyse."""
    policy = policy or Policy()
    return Analysis(
        experiment_id=None, status=None, candidate_share=None, primary_metric=DEFAULT_PRIMARY,
        arms={arm: _arm_summary(None) for arm in ARMS},
        srm={"p_value": None, "mismatch": False, "observed": [0, 0], "expected": None, "phases": []},
        thumbs_up=_label(None, _THUMBS_KEYS), rating=_label(None, _RATING_KEYS),
        guardrails={"breached": [], "checked": False, "results": {}},
        decision=Decision(NOT_ENOUGH_DATA, reason).to_dict(), policy=policy.to_dict(),
    )


def analyse(db: Database, experiment_id: str | None = None, policy: Policy | None = None,
            until: datetime | None = None) -> Analysis:
    """Analyse an experiment (default: the running one), as it stood at `until` (default: now); never writes."""
    policy = policy or Policy()
    if experiment_id is None:
        running = get_running(db)
        if running is None:
            return empty("no running experiment", policy)
        experiment_id = running.id
    collected = collect(db, experiment_id, cuped_lookback_days=_lookback_days(policy), until=until)
    return analyse_collected(collected, policy)


def _lookback_days(policy: Policy) -> float:
    return policy.cuped_lookback_days if policy.cuped else 0


def timeline(db: Database, experiment_id: str, policy: Policy | None = None, points: int = 12) -> list[dict[str, Any]]:
    """The primary metric over time: per arm with its always-valid interval, and the difference's.

    Each point re-analyses the experiment as it stood then, so the band is what an operator
    evaluating at that moment would have seen.
    """
    from sqlalchemy import func, select

    from store.models import SearchEvent

    policy = policy or Policy()
    with db.session() as session:
        first, last = session.execute(
            select(func.min(SearchEvent.ts), func.max(SearchEvent.ts)).where(SearchEvent.experiment_id == experiment_id)
        ).one()
    if first is None:
        return []
    step = (last - first) / max(points - 1, 1)
    moments = [last if n == points - 1 else first + step * n for n in range(points)]
    series = []
    for until, collected in zip(moments, collect_at(db, experiment_id, moments,
                                                     cuped_lookback_days=_lookback_days(policy)), strict=True):
        analysis = analyse_collected(collected, policy)
        primary = analysis.primary or {}
        series.append({"ts": until.isoformat(), "users": [analysis.arms[a]["users"] for a in ARMS],
                       # The share in force then, not today's.
                       "share": analysis.phases[-1]["share"] if analysis.phases else analysis.candidate_share,
                       "arms": primary.get("arms"),
                       "difference": primary.get("difference"), "ci": primary.get("ci"),
                       "action": analysis.action})
    return series



def analyse_collected(collected: Collected, policy: Policy | None = None) -> Analysis:
    policy = policy or Policy()
    experiment = collected.experiment
    control, candidate = collected.arms["control"], collected.arms["candidate"]
    primary_name = experiment.primary_metric or DEFAULT_PRIMARY

    metrics = {name: _compare(name, control, candidate, policy, collected.left_out_by_phase) for name in METRICS}
    metrics["latency_p95_ms"] = _compare_quantile(control, candidate, 0.95, policy, collected.left_out_by_phase)
    primary = metrics.get(primary_name)
    if primary is not None:
        primary = dict(primary, metric=primary_name, label=METRICS[primary_name].label,
                       arms={"control": _arm_sequence(control, primary_name, policy),
                             "candidate": _arm_sequence(candidate, primary_name, policy)})

    phases, mismatches = _phases(collected)
    users = (control.users, candidate.users)
    guardrails = _guardrails(metrics, users, policy)
    denominator = METRICS[primary_name].denominator
    decision = decide(
        has_candidate=bool(experiment.candidate_base_url),
        srm_mismatch=mismatches,
        users=users,
        signals=(control.total(denominator), candidate.total(denominator)),
        responders=(control.users_with(denominator), candidate.users_with(denominator)),
        breached=guardrails["breached"],
        primary=primary,
        primary_name=primary_name,
        policy=policy,
    )
    observed = [sum(p["users"][0] for p in phases), sum(p["users"][1] for p in phases)]
    expected = [sum(p["expected"][0] for p in phases if p["expected"]), sum(p["expected"][1] for p in phases
                                                                            if p["expected"])]
    p_values = [p["p_value"] for p in phases if p["p_value"] is not None]
    return Analysis(
        experiment_id=experiment.id,
        status=experiment.status,
        candidate_share=experiment.candidate_share,
        primary_metric=primary_name,
        arms={"control": _arm_summary(control), "candidate": _arm_summary(candidate)},
        srm={"p_value": min(p_values) if p_values else None, "mismatch": bool(mismatches), "observed": observed,
             "expected": expected, "threshold": SRM_P, "phases": phases,
             "note": "per phase, each against that phase's share; the users first seen in a phase, by their arm then"},
        thumbs_up=_label(stats.two_proportions(control.total("thumbs_up"), control.total("thumbs"),
                                               candidate.total("thumbs_up"), candidate.total("thumbs"), policy.alpha),
                         _THUMBS_KEYS),
        rating=_label(_ratings_welch(collected, policy.alpha), _RATING_KEYS),
        guardrails=guardrails,
        decision=decision.to_dict(),
        metrics=metrics,
        primary=primary,
        phases=phases,
        assignment={"rule": "first assignment", "users_in_both_arms": collected.crossovers,
                    "requests_excluded": collected.excluded_requests,
                    "users_left_out": collected.left_out_users, "requests_left_out": collected.left_out_requests,
                    "note": "users whose bucket a later share change moves to the other arm are left out, "
                            "whether or not they came back",
                    "anonymous_requests": collected.anonymous_requests},
        sequential={"method": SEQUENTIAL_METHOD, "alpha": policy.alpha, "tuning_users": policy.sequential_tuning},
        policy=policy.to_dict(),
    )


# The fixed-horizon blocks' keys, there with null values when an arm has too little to compare: readers of
# `abloop evaluate --json` index them (DESIGN: thumbs_up.{...}, rating.{...}) whatever the data.
_THUMBS_KEYS = ("control", "candidate", "lift", "ci", "p_value", "chance_to_win")
_RATING_KEYS = ("control", "candidate", "lift", "ci", "p_value")


def _label(block: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any]:
    return dict(block or dict.fromkeys(keys), label=FIXED_LABEL)


def _ratings_welch(collected: Collected, alpha: float) -> dict[str, Any] | None:
    """Welch's test on per-user mean ratings (users who rated), the fixed-horizon reference block."""
    means = []
    for arm in ARMS:
        columns = collected.arms[arm].columns
        rated = columns["ratings"] > 0
        means.append((columns["rating_sum"][rated] / columns["ratings"][rated]).tolist())
    return stats.welch(means[0], means[1], alpha)


def _compare(name: str, control: ArmUsers, candidate: ArmUsers, policy: Policy,
             left_out_by_phase: dict[int, int]) -> dict[str, Any] | None:
    """Candidate against control within each phase of first assignment, combined (see stats.stratified).

    Each phase weighs as the users first seen in it, those left out by bucket included: the compared users are a
    random subset of them (by bucket), and weighing by the subset would under-weigh the phases a ramp thinned.
    """
    metric = METRICS[name]
    use_pre = policy.cuped and name in control.pre and name in candidate.pre
    parts, sizes = [], []
    for stratum in np.intersect1d(control.strata, candidate.strata):
        a, b = control.strata == stratum, candidate.strata == stratum
        if not _enough_responders(control.columns[metric.denominator][a], candidate.columns[metric.denominator][b],
                                  policy.min_responders_per_arm):
            continue
        part = stats.compare_ratio(
            control.columns[metric.numerator][a], control.columns[metric.denominator][a],
            candidate.columns[metric.numerator][b], candidate.columns[metric.denominator][b],
            alpha=policy.alpha, tuning=policy.sequential_tuning,
            control_pre=control.pre[name][a] if use_pre else None,
            candidate_pre=candidate.pre[name][b] if use_pre else None,
        )
        if part is not None:
            parts.append(part)
            sizes.append(int(a.sum() + b.sum()) + left_out_by_phase.get(int(stratum), 0))
    if not parts:
        return None
    pooled = [stats.ratio_estimate(arm.columns[metric.numerator], arm.columns[metric.denominator]).value
              for arm in (control, candidate)]
    comparison = stats.stratified(parts, control=pooled[0], candidate=pooled[1], alpha=policy.alpha,
                                  tuning=policy.sequential_tuning, sizes=sizes)
    if comparison is None:
        return None
    return {
        "higher_is_better": metric.higher_is_better,
        "control": comparison.control,
        "candidate": comparison.candidate,
        "difference": comparison.difference,
        "relative": comparison.relative,
        "ci": list(comparison.sequential_ci),
        "p_value": comparison.sequential_p_value,
        "chance_to_win": comparison.chance_to_win if metric.higher_is_better else 1 - comparison.chance_to_win,
        "std_error": comparison.std_error,
        "fixed_horizon": {"ci": list(comparison.fixed_ci), "p_value": comparison.fixed_p_value},
        "cuped": comparison.cuped,
        "users": list(comparison.users),
        "responders": [control.users_with(metric.denominator), candidate.users_with(metric.denominator)],
        "numerator_users": [control.users_with(metric.numerator), candidate.users_with(metric.numerator)],
        "strata": len(parts),
    }


def _enough_responders(control_den: np.ndarray, candidate_den: np.ndarray, minimum: int) -> bool:
    """Whether a phase's smaller arm is expected to hold `minimum` users with a non-zero denominator.

    Per phase, as for the whole arm: a 2% first phase of thousands of users, with three candidate users who gave
    feedback, would otherwise carry most of the weight on those three. Expected at the phase's pooled rate, so the
    choice never looks at the difference between the arms.
    """
    users = control_den.size + candidate_den.size
    with_signal = np.count_nonzero(control_den) + np.count_nonzero(candidate_den)
    return min(control_den.size, candidate_den.size) * with_signal / users >= minimum


def _arm_sequence(arm: ArmUsers, name: str, policy: Policy) -> dict[str, Any]:
    """One arm's value of a metric with its own always-valid interval (for the metric-over-time chart)."""
    metric = METRICS[name]
    estimate = stats.ratio_estimate(arm.columns[metric.numerator], arm.columns[metric.denominator])
    if estimate.users < 2 or math.isnan(estimate.variance):  # the ratio or its variance is undefined
        return {"value": estimate.value, "ci": None, "users": estimate.users}
    ci, _p = stats.sequential_interval(estimate.value, estimate.variance, estimate.users, policy.alpha,
                                       policy.sequential_tuning)
    return {"value": estimate.value, "ci": list(ci), "users": estimate.users}


def _compare_quantile(control: ArmUsers, candidate: ArmUsers, q: float, policy: Policy,
                      left_out_by_phase: dict[int, int]) -> dict[str, Any] | None:
    """A quantile of the requests' latency, within each phase of first assignment, combined as `_compare` does.

    Pooled over phases, a ramp would turn a change in latency over time (load, a slow dependency) that hits both
    arms alike into a difference: after 10% -> 50%, most of the candidate's requests come from the new phase and
    most of control's from the old. Clustered by user within a phase (gbstats QuantileClusteredStatistic): a
    user's requests are alike, and users were randomised.
    """
    import numpy as np

    pooled = stats.compare_quantile(control.latencies_ms, candidate.latencies_ms, q, alpha=policy.alpha,
                                    tuning=policy.sequential_tuning, control_clusters=control.latency_users,
                                    candidate_clusters=candidate.latency_users)
    if pooled is None:
        return None
    # Each timed request's phase: that of its user's first request.
    phase_a, phase_b = control.strata[control.latency_users], candidate.strata[candidate.latency_users]
    parts, sizes = [], []
    for stratum in np.intersect1d(control.strata, candidate.strata):
        a, b = phase_a == stratum, phase_b == stratum
        part = stats.compare_quantile(control.latencies_ms[a], candidate.latencies_ms[b], q, alpha=policy.alpha,
                                      tuning=policy.sequential_tuning, control_clusters=control.latency_users[a],
                                      candidate_clusters=candidate.latency_users[b])
        if part is not None:  # too few requests in a phase to place the quantile: the others carry it
            parts.append(part)
            sizes.append(int((control.strata == stratum).sum() + (candidate.strata == stratum).sum())
                         + left_out_by_phase.get(int(stratum), 0))
    if not parts:
        return None
    comparison = stats.stratified(parts, control=pooled.control, candidate=pooled.candidate, alpha=policy.alpha,
                                  tuning=policy.sequential_tuning, sizes=sizes)
    return {"higher_is_better": False, "control": comparison.control, "candidate": comparison.candidate,
            "difference": comparison.difference, "relative": comparison.relative, "ci": list(comparison.sequential_ci),
            "p_value": comparison.sequential_p_value, "std_error": comparison.std_error, "unit": "requests",
            "strata": len(parts)}


def _guardrails(metrics: dict[str, Any], users: tuple[int, int], policy: Policy) -> dict[str, Any]:
    checked = min(users) >= policy.min_users_per_arm
    results: dict[str, Any] = {}
    breached: list[str] = []
    for guardrail in policy.guardrails:
        comparison = metrics.get(guardrail.metric)
        if comparison is None:
            results[guardrail.metric] = {"status": "no data"}
            continue
        hit, margin = guardrail_breached(guardrail, control=comparison["control"], ci=tuple(comparison["ci"]),
                                         higher_is_better=comparison["higher_is_better"])
        # Latency counts requests, not responders; the others need enough users behind their denominator in each
        # arm, and a breach enough behind the numerator in the two together: a feedback rate that rests on two
        # users' feedback, or an error rate on two users' errors, is those users, not the arm (scenario 5 of
        # bench/stats_calibration.py). No errors at all is no breach, and says so.
        sampled = checked and min(comparison.get("responders", users)) >= policy.min_responders_per_arm
        if hit and sum(comparison.get("numerator_users", users)) < policy.min_responders_per_arm:
            sampled = False
        hit = hit and sampled
        results[guardrail.metric] = {"status": "breached" if hit else ("ok" if sampled else "waiting for sample"),
                                     "margin": margin, "relative_margin": guardrail.relative,
                                     "difference": comparison["difference"], "ci": comparison["ci"]}
        if hit:
            breached.append(f"{guardrail.metric} {comparison['control']:.4g} -> {comparison['candidate']:.4g} "
                            f"(worse by more than {margin:.4g} at level {policy.alpha})")
    return {"breached": breached, "checked": checked, "results": results,
            "note": "one-sided against a margin on the always-valid interval; only after the minimum sample"}


EMPTY_ARM_TOLERANCE = 0.01
EMPTY_ARM_MIN_USERS = 5


def _phases(collected: Collected) -> tuple[list[dict[str, Any]], list[str]]:
    rows, mismatches = [], []
    for count in collected.phases:
        phase = count.phase
        total, share = sum(count.users), bucketed_share(phase.share)
        p_value = stats.sample_ratio(list(count.users), [1 - share, share])
        mismatch = p_value is not None and p_value < SRM_P
        if mismatch:
            mismatches.append(f"phase {phase.index + 1} (share {phase.share:.0%}, p={p_value:.2g})")
        elif share in (0.0, 1.0) and _crowded_empty_arm(count.users[share == 0.0], total):
            mismatch = True
            mismatches.append(f"phase {phase.index + 1} (share {phase.share:.0%}, "
                              f"{count.users[share == 0.0]} of {total} new users in the arm it leaves empty)")
        rows.append({
            "index": phase.index, "share": phase.share, "start": phase.start.isoformat(),
            "end": phase.end.isoformat() if phase.end else None, "reason": phase.reason,
            "users": list(count.users),
            "active_users": total if count.active is None else count.active,
            "expected": [total * (1 - share), total * share] if total else None,
            "p_value": p_value, "mismatch": mismatch,
        })
    return rows, mismatches


def _crowded_empty_arm(users: int, total: int) -> bool:
    """Whether the arm a 0% or 100% share leaves empty holds more users than a replica's refresh lag puts there.

    No chi-square tests such a split (an expected count of 0), yet a 100% step still split 50/50 (a replica
    serving an old share) would promote on a comparison nobody randomised. Replicas take a new share within
    seconds, so the users that lag can put in the wrong arm are a few of a phase's first moments:
    `EMPTY_ARM_TOLERANCE` of its new users, and at least `EMPTY_ARM_MIN_USERS`, are allowed for.
    """
    return users > max(EMPTY_ARM_MIN_USERS, EMPTY_ARM_TOLERANCE * total)


def _arm_summary(arm: ArmUsers | None) -> dict[str, Any]:
    """Point figures per arm; the keys of the first version stay (`abloop evaluate --json` only grows)."""
    import numpy as np

    if arm is None:
        return {"users": 0, "requests": 0, "thumbs": 0, "ratings": 0}

    def ratio(num: str, den: str) -> float | None:
        total = arm.total(den)
        return arm.total(num) / total if total else None

    latencies = arm.latencies_ms
    return {
        "users": arm.users,
        "requests": int(arm.total("requests")),
        "thumbs": int(arm.total("thumbs")),
        "thumbs_up": int(arm.total("thumbs_up")),
        "thumbs_up_rate": ratio("thumbs_up", "thumbs"),
        "thumbs_up_per_request": ratio("thumbs_up", "requests"),
        "feedback_rate": ratio("feedback_events", "requests"),
        "satisfaction": ratio("satisfaction_sum", "satisfaction_n"),
        "ratings": int(arm.total("ratings")),
        "mean_rating": ratio("rating_sum", "ratings"),
        "correction_rate": ratio("corrections", "requests"),
        "error_rate": ratio("errors", "requests"),
        "fallback_rate": ratio("fallbacks", "requests"),
        "answer_score": ratio("grounding_sum", "grounding_n"),
        "answers_scored": int(arm.total("grounding_n")),
        "judge_score": ratio("judge_sum", "judge_n"),
        "latency_p50_ms": float(np.percentile(latencies, 50)) if latencies.size else None,
        "latency_p95_ms": float(np.percentile(latencies, 95)) if latencies.size else None,
        "tokens_in": int(arm.total("tokens_in")),
        "tokens_out": int(arm.total("tokens_out")),
    }
