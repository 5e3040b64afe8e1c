"""Per-arm analysis of an experiment and the decision it supports.

Everything is by *assigned* arm (intention to treat): a candidate request that fell back to
control still counts for the candidate, so a flaky candidate cannot hide its failures.
scipy and numpy are imported inside the functions: `import store` stays light.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select

from store.db import Database
from store.models import Experiment, Feedback, SearchEvent, utcnow

ARMS = ("control", "candidate")
SRM_P = 0.001  # below this the split itself is broken and no comparison is trusted


@dataclass(frozen=True)
class Policy:
    min_signals_per_arm: int = 100  # thumbs + ratings per arm before any verdict
    alpha: float = 0.05
    promote_chance: float = 0.95
    rollback_chance: float = 0.05
    max_error_rate_increase: float = 0.02
    max_p95_latency_ratio: float = 1.5


@dataclass
class ArmStats:
    users: int = 0
    requests: int = 0
    thumbs_up: int = 0
    thumbs_down: int = 0
    ratings: list[int] = field(default_factory=list)
    corrections: int = 0
    errors: int = 0
    fallbacks: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0

    def summary(self) -> dict[str, Any]:
        import numpy as np

        thumbs = self.thumbs_up + self.thumbs_down
        latencies = np.asarray(self.latencies_ms) if self.latencies_ms else None
        return {
            "users": self.users,
            "requests": self.requests,
            "thumbs": thumbs,
            "thumbs_up_rate": self.thumbs_up / thumbs if thumbs else None,
            "ratings": len(self.ratings),
            "mean_rating": float(np.mean(self.ratings)) if self.ratings else None,
            "correction_rate": self.corrections / self.requests if self.requests else None,
            "error_rate": self.errors / self.requests if self.requests else None,
            "fallback_rate": self.fallbacks / self.requests if self.requests else None,
            "latency_p50_ms": float(np.percentile(latencies, 50)) if latencies is not None else None,
            "latency_p95_ms": float(np.percentile(latencies, 95)) if latencies is not None else None,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
        }


@dataclass
class Analysis:
    experiment_id: str
    candidate_share: float
    arms: dict[str, dict[str, Any]]
    srm: dict[str, Any]
    thumbs_up: dict[str, Any] | None
    rating: dict[str, Any] | None
    guardrails: dict[str, Any]
    decision: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect(db: Database, experiment_id: str) -> tuple[Experiment, dict[str, ArmStats]]:
    stats = {arm: ArmStats() for arm in ARMS}
    users: dict[str, set[str]] = {arm: set() for arm in ARMS}
    with db.session() as session:
        experiment = session.get(Experiment, experiment_id)
        if experiment is None:
            raise LookupError(f"unknown experiment {experiment_id!r}")
        events = session.execute(
            select(SearchEvent.id, SearchEvent.arm, SearchEvent.user_id, SearchEvent.status,
                   SearchEvent.timings, SearchEvent.tokens_in, SearchEvent.tokens_out)
            .where(SearchEvent.experiment_id == experiment_id)
        ).all()
        arm_of = {}
        for event_id, arm, user_id, status, timings, tokens_in, tokens_out in events:
            if arm not in stats:
                continue
            arm_of[event_id] = arm
            s = stats[arm]
            s.requests += 1
            s.errors += status == "error"
            s.fallbacks += status == "fallback"
            s.tokens_in += tokens_in or 0
            s.tokens_out += tokens_out or 0
            if user_id:
                users[arm].add(user_id)
            if timings and timings.get("total") is not None:
                s.latencies_ms.append(float(timings["total"]))
        feedback = session.execute(
            select(Feedback.event_id, Feedback.thumbs, Feedback.rating, Feedback.corrected_answer)
            .join(SearchEvent, SearchEvent.id == Feedback.event_id)
            .where(SearchEvent.experiment_id == experiment_id)
        ).all()
    for event_id, thumbs, rating, corrected in feedback:
        s = stats[arm_of[event_id]] if event_id in arm_of else None
        if s is None:
            continue
        s.thumbs_up += thumbs == "up"
        s.thumbs_down += thumbs == "down"
        if rating is not None:
            s.ratings.append(rating)
        s.corrections += corrected is not None
    for arm in ARMS:
        stats[arm].users = len(users[arm])
    return experiment, stats


def analyse(db: Database, experiment_id: str, policy: Policy | None = None) -> Analysis:
    policy = policy or Policy()
    experiment, stats = collect(db, experiment_id)
    control, candidate = stats["control"], stats["candidate"]
    srm = sample_ratio_check(control.users, candidate.users, experiment.candidate_share)
    thumbs = two_proportions(control.thumbs_up, control.thumbs_up + control.thumbs_down,
                             candidate.thumbs_up, candidate.thumbs_up + candidate.thumbs_down, policy.alpha)
    rating = welch(control.ratings, candidate.ratings, policy.alpha)
    summaries = {arm: stats[arm].summary() for arm in ARMS}
    guardrails = _guardrails(summaries, policy)
    decision = _decide(stats, srm, thumbs, guardrails, policy)
    return Analysis(experiment.id, experiment.candidate_share, summaries, srm, thumbs, rating, guardrails, decision)


def evaluate(db: Database, experiment_id: str | None = None, policy: Policy | None = None) -> Analysis:
    """Analyse an experiment (default: the running one) and record its decision."""
    from store import experiments

    if experiment_id is None:
        running = experiments.get_running(db)
        if running is None:
            raise LookupError("no running experiment; name one")
        experiment_id = running.id
    analysis = analyse(db, experiment_id, policy)
    record_decision(db, analysis)
    return analysis


def record_decision(db: Database, analysis: Analysis) -> None:
    """Write the decision on the experiment, where `promote` (API or CLI) looks for it."""
    with db.session() as session:
        experiment = session.get(Experiment, analysis.experiment_id)
        if experiment is not None and experiment.status == "running":
            experiment.decision = dict(analysis.decision, evaluated_at=utcnow().isoformat())


def sample_ratio_check(control_users: int, candidate_users: int, share: float) -> dict[str, Any]:
    """Chi-square goodness of fit of the users per arm against the configured share."""
    from scipy.stats import chisquare

    total = control_users + candidate_users
    if total == 0 or share in (0.0, 1.0):
        return {"p_value": None, "mismatch": False, "observed": [control_users, candidate_users]}
    expected = [total * (1 - share), total * share]
    p_value = float(chisquare([control_users, candidate_users], expected).pvalue)
    return {"p_value": p_value, "mismatch": p_value < SRM_P, "observed": [control_users, candidate_users],
            "expected": expected}


def two_proportions(x_a: int, n_a: int, x_b: int, n_b: int, alpha: float) -> dict[str, Any] | None:
    """Lift (b - a) of a rate with a Wald interval, a pooled z-test, and P(b > a) under Beta(1, 1) priors."""
    import numpy as np
    from scipy.stats import norm

    if n_a == 0 or n_b == 0:
        return None
    p_a, p_b = x_a / n_a, x_b / n_b
    lift = p_b - p_a
    se = np.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    pooled = (x_a + x_b) / (n_a + n_b)
    se_pooled = np.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    p_value = float(2 * norm.sf(abs(lift) / se_pooled)) if se_pooled > 0 else 1.0
    z = norm.ppf(1 - alpha / 2)
    rng = np.random.default_rng(0)  # fixed: the same data gives the same chance to win
    draws_a = rng.beta(1 + x_a, 1 + n_a - x_a, 20_000)
    draws_b = rng.beta(1 + x_b, 1 + n_b - x_b, 20_000)
    return {"control": p_a, "candidate": p_b, "lift": lift, "ci": [lift - z * se, lift + z * se],
            "p_value": p_value, "chance_to_win": float(np.mean(draws_b > draws_a))}


def welch(a: list[float], b: list[float], alpha: float) -> dict[str, Any] | None:
    """Difference of means (b - a) with Welch's t-test and interval."""
    import numpy as np
    from scipy.stats import t, ttest_ind

    if len(a) < 2 or len(b) < 2:
        return None
    mean_a, mean_b = float(np.mean(a)), float(np.mean(b))
    var_a, var_b = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = float(np.sqrt(var_a + var_b))
    if se == 0:
        return {"control": mean_a, "candidate": mean_b, "lift": mean_b - mean_a, "ci": [mean_b - mean_a] * 2,
                "p_value": 1.0 if mean_a == mean_b else 0.0}
    dof = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    margin = float(t.ppf(1 - alpha / 2, dof)) * se
    p_value = float(ttest_ind(b, a, equal_var=False).pvalue)
    return {"control": mean_a, "candidate": mean_b, "lift": mean_b - mean_a,
            "ci": [mean_b - mean_a - margin, mean_b - mean_a + margin], "p_value": p_value}


def _guardrails(arms: dict[str, dict[str, Any]], policy: Policy) -> dict[str, Any]:
    control, candidate = arms["control"], arms["candidate"]
    breached = []
    if candidate["requests"] and control["requests"] is not None:
        if (candidate["error_rate"] or 0) > (control["error_rate"] or 0) + policy.max_error_rate_increase:
            breached.append("error rate")
        if (candidate["fallback_rate"] or 0) > (control["fallback_rate"] or 0) + policy.max_error_rate_increase:
            breached.append("fallback rate")
        p95_c, p95_b = control["latency_p95_ms"], candidate["latency_p95_ms"]
        if p95_c and p95_b and p95_b > policy.max_p95_latency_ratio * p95_c:
            breached.append("p95 latency")
    return {"breached": breached, "policy": asdict(policy)}


def _decide(stats: dict[str, ArmStats], srm: dict[str, Any], thumbs: dict[str, Any] | None,
            guardrails: dict[str, Any], policy: Policy) -> dict[str, Any]:
    def verdict(action: str, reason: str) -> dict[str, Any]:
        return {"action": action, "reason": reason}

    if srm["mismatch"]:
        return verdict("keep_running", f"sample ratio mismatch (p={srm['p_value']:.2g}): the split is broken; "
                                       "fix assignment before trusting any comparison")
    if guardrails["breached"]:
        return verdict("roll_back", "guardrail breached: " + ", ".join(guardrails["breached"]))
    signals = {arm: s.thumbs_up + s.thumbs_down + len(s.ratings) for arm, s in stats.items()}
    if min(signals.values()) < policy.min_signals_per_arm or thumbs is None:
        return verdict("not_enough_data", f"feedback signals per arm {signals}; need {policy.min_signals_per_arm}")
    if thumbs["chance_to_win"] >= policy.promote_chance and thumbs["p_value"] < policy.alpha:
        return verdict("promote", f"thumbs-up rate {thumbs['control']:.3f} -> {thumbs['candidate']:.3f} "
                                  f"(p={thumbs['p_value']:.2g}, chance to win {thumbs['chance_to_win']:.3f})")
    if thumbs["chance_to_win"] <= policy.rollback_chance and thumbs["p_value"] < policy.alpha:
        return verdict("roll_back", f"candidate is worse: thumbs-up rate {thumbs['control']:.3f} -> "
                                    f"{thumbs['candidate']:.3f} (p={thumbs['p_value']:.2g})")
    return verdict("keep_running", f"no significant difference yet (p={thumbs['p_value']:.2g}, "
                                   f"chance to win {thumbs['chance_to_win']:.3f})")
