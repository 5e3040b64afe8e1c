"""The rule that turns an analysis into an action: promote, keep running, roll back, or not enough data.

The rule reads only always-valid (sequential) intervals, so it may be applied after every hourly
evaluation without inflating false decisions; the fixed-horizon figures are reported beside them
for reference and never decide. Guardrails are one-sided tests against a margin, checked only
once the minimum sample is reached, so early noise cannot trigger a roll back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from store.config import Settings

PROMOTE, KEEP_RUNNING, ROLL_BACK, NOT_ENOUGH_DATA = "promote", "keep_running", "roll_back", "not_enough_data"
ACTIONS = (PROMOTE, KEEP_RUNNING, ROLL_BACK, NOT_ENOUGH_DATA)
# Below this a phase's split is broken and no comparison is trusted. Tested again at every look: about 2% of A/A
# phases alarm once in 336 hourly looks (bench/srm_looks.py). An alarm only holds; an anytime-valid test would
# alarm less but catch a real mismatch half as fast, and a missed one biases the verdict (docs/BENCHMARKS.md).
SRM_P = 0.001


@dataclass(frozen=True)
class Guardrail:
    """The candidate may not be worse than control by more than `margin` (a fraction of control if relative)."""

    metric: str
    margin: float
    relative: bool = False


DEFAULT_GUARDRAILS = (
    Guardrail("error_rate", 0.02),
    Guardrail("fallback_rate", 0.02),
    Guardrail("latency_p95_ms", 0.5, relative=True),
    Guardrail("feedback_rate", 0.2, relative=True),
    Guardrail("answer_score", 0.05),
)


@dataclass(frozen=True)
class Policy:
    alpha: float = 0.05
    # Users (both arms) at which the confidence sequence is tightest (GrowthBook's default).
    sequential_tuning: float = 5000.0
    min_users_per_arm: int = 100
    min_signals_per_arm: int = 50  # of the primary metric's denominator: e.g. feedback given
    # Users with a non-zero denominator (who gave feedback, whose answer was scored), for the primary metric and
    # each guardrail: the delta method's variance rests on them, and with a handful it is far too small
    # (bench/few_responders.py: with two responders an arm, 6% of A/A tests promoted against a nominal 2.5%).
    min_responders_per_arm: int = 20
    guardrails: tuple[Guardrail, ...] = field(default=DEFAULT_GUARDRAILS)
    cuped: bool = True
    cuped_lookback_days: float = 14.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(min_users_per_arm=settings.experiment_min_users_per_arm,
                   min_signals_per_arm=settings.experiment_min_signals_per_arm,
                   min_responders_per_arm=settings.experiment_min_responders_per_arm,
                   sequential_tuning=settings.experiment_sequential_tuning)


@dataclass(frozen=True)
class Decision:
    action: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"action": self.action, "reason": self.reason}


def guardrail_breached(guardrail: Guardrail, *, control: float, ci: tuple[float, float],
                       higher_is_better: bool) -> tuple[bool, float]:
    """(breached, margin in the metric's units) from the always-valid interval of candidate - control.

    Breached only when the whole interval lies beyond the margin on the bad side: the data show,
    at level alpha (one side of a two-sided sequence), that the candidate is worse by more than allowed.
    """
    margin = guardrail.margin * abs(control) if guardrail.relative else guardrail.margin
    low, high = ci
    breached = high < -margin if higher_is_better else low > margin
    return breached, margin


def decide(
    *,
    has_candidate: bool,
    srm_mismatch: list[str],
    users: tuple[int, int],
    signals: tuple[float, float],
    responders: tuple[int, int],
    breached: list[str],
    primary: dict[str, Any] | None,
    primary_name: str,
    policy: Policy,
) -> Decision:
    """The decision, in order of precedence. `primary` is the primary metric's comparison as a dict."""
    if not has_candidate:
        return Decision(NOT_ENOUGH_DATA, "no candidate arm: nothing to compare")
    enough_users = min(users) >= policy.min_users_per_arm
    split = "sample ratio mismatch in " + "; ".join(srm_mismatch) if srm_mismatch else ""
    # A broken split may fake a breach as well as hide one; rolling back is the safe way to be wrong.
    if enough_users and breached:
        also = f" (and a {split}: the split is broken too)" if split else ""
        return Decision(ROLL_BACK, "guardrail breached: " + "; ".join(breached) + also)
    if split:
        return Decision(KEEP_RUNNING, split + ": the split is broken, fix assignment before trusting any comparison")
    if not enough_users:
        return Decision(NOT_ENOUGH_DATA, f"users per arm {list(users)}; need {policy.min_users_per_arm} in each")
    if (min(signals) < policy.min_signals_per_arm or min(responders) < policy.min_responders_per_arm
            or primary is None):
        return Decision(NOT_ENOUGH_DATA, f"{primary_name} observations per arm {[int(s) for s in signals]} from "
                                         f"{list(responders)} users; need {policy.min_signals_per_arm} from "
                                         f"{policy.min_responders_per_arm} users in each")
    low, high = primary["ci"]
    summary = (f"{primary_name} {primary['control']:.4g} -> {primary['candidate']:.4g}, difference "
               f"{primary['difference']:+.4g}, always-valid {1 - policy.alpha:.0%} interval [{low:+.4g}, {high:+.4g}]")
    if low > 0:
        return Decision(PROMOTE, f"candidate is better: {summary}")
    if high < 0:
        return Decision(ROLL_BACK, f"candidate is worse: {summary}")
    return Decision(KEEP_RUNNING, f"no significant difference yet: {summary}")
