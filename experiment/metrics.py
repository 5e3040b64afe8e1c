"""What is measured per user and arm (experiment.collect reads it from the store).

The user is the unit of randomisation, so it is the unit of analysis: every metric is a ratio of
per-user sums (thumbs-up per request = sum of a user's thumbs-up / sum of their requests), and its
variance comes from the delta method over users (`experiment.stats.ratio_estimate`). Treating one
user's ten requests as ten independent trials understates the variance and inflates false wins.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from experiment.phases import Phase
from store.models import Experiment

if TYPE_CHECKING:
    import numpy as np

ARMS = ("control", "candidate")

# Per-user sums. A feedback row's satisfaction is the mean of the signals it carries, each on 0..1:
# thumbs up 1 / down 0, rating (r - 1) / 4. It lets thumbs and ratings decide together, and either alone.
COLUMNS = (
    "requests", "errors", "fallbacks", "tokens_in", "tokens_out",
    "feedback_events", "thumbs_up", "thumbs", "rating_sum", "ratings", "corrections",
    "satisfaction_sum", "satisfaction_n", "grounding_sum", "grounding_n", "judge_sum", "judge_n",
)


@dataclass(frozen=True)
class Metric:
    name: str
    numerator: str
    denominator: str
    higher_is_better: bool
    label: str


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("satisfaction", "satisfaction_sum", "satisfaction_n", True,
           "satisfaction per feedback (thumbs up = 1, down = 0, rating r = (r-1)/4)"),
    Metric("thumbs_up_per_request", "thumbs_up", "requests", True, "thumbs-up per request"),
    Metric("thumbs_up_rate", "thumbs_up", "thumbs", True, "thumbs-up among thumbs given (responders)"),
    Metric("feedback_rate", "feedback_events", "requests", True, "requests that got any feedback"),
    Metric("mean_rating", "rating_sum", "ratings", True, "mean rating (1-5)"),
    Metric("correction_rate", "corrections", "requests", False, "corrections per request"),
    Metric("error_rate", "errors", "requests", False, "requests no arm answered"),
    Metric("fallback_rate", "fallbacks", "requests", False, "requests served by the other arm"),
    Metric("answer_score", "grounding_sum", "grounding_n", True, "answer grounded in retrieved items (0-1)"),
    Metric("judge_score", "judge_sum", "judge_n", True, "LLM judge score (0-1)"),
    Metric("tokens_out_per_request", "tokens_out", "requests", False, "output tokens per request"),
)}
PRIMARY_METRICS = ("satisfaction", "thumbs_up_per_request", "thumbs_up_rate", "mean_rating", "answer_score",
                   "judge_score")
DEFAULT_PRIMARY = "satisfaction"


@dataclass
class ArmUsers:
    """One arm's users as aligned per-user arrays, plus per-request latencies for quantiles."""

    user_ids: list[str]
    columns: dict[str, np.ndarray]
    latencies_ms: np.ndarray
    strata: np.ndarray  # per user: the phase of their first request (comparisons are made within phases)
    pre: dict[str, np.ndarray] = field(default_factory=dict)  # metric name -> the user's value before (nan: none)
    # Per latency: the index in `user_ids` of the user who made the request (the quantile's clusters);
    # None: requests taken as independent.
    latency_users: np.ndarray | None = None

    @property
    def users(self) -> int:
        return len(self.columns["requests"])

    def total(self, column: str) -> float:
        return float(self.columns[column].sum())

    def users_with(self, column: str) -> int:
        """Users with a non-zero `column`: for a metric's denominator, its responders, the users its estimate
        rests on (who gave feedback, whose answer was scored)."""
        return int(self.columns[column].astype(bool).sum())


@dataclass(frozen=True)
class PhaseCount:
    phase: Phase
    users: tuple[int, int]  # users first seen in the phase, by the arm assigned then (control, candidate)
    active: int | None = None  # users with a request in the phase, returning ones included (None: sum of users)


@dataclass
class Collected:
    experiment: Experiment
    arms: dict[str, ArmUsers]
    phases: list[PhaseCount]
    crossovers: int = 0  # users seen in both arms
    excluded_requests: int = 0  # their requests in the arm they were moved to
    # Users first seen in a phase whose bucket a later share moves (see the module's docstring), by that phase.
    left_out_by_phase: dict[int, int] = field(default_factory=dict)
    left_out_requests: int = 0  # their requests (in either arm)
    anonymous_requests: int = 0  # no user id: always control, not randomised, left out
    timeline: list[dict[str, Any]] = field(default_factory=list)

    @property
    def left_out_users(self) -> int:
        return sum(self.left_out_by_phase.values())


def satisfaction(thumbs: str | None, rating: int | None) -> float | None:
    signals = []
    if thumbs in ("up", "down"):
        signals.append(1.0 if thumbs == "up" else 0.0)
    if rating is not None:
        signals.append((rating - 1) / 4)
    return sum(signals) / len(signals) if signals else None


class UserSums:
    """Per-user sums keyed by user id, filled from event and feedback rows (per arm here, per week in `weekly`)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(COLUMNS, 0.0))

    def add_event(self, user: str, status: str, tokens_in: int | None, tokens_out: int | None) -> None:
        row = self.rows[user]
        row["requests"] += 1
        row["errors"] += status == "error"
        row["fallbacks"] += status == "fallback"
        row["tokens_in"] += tokens_in or 0
        row["tokens_out"] += tokens_out or 0

    def add_feedback(self, user: str, thumbs: str | None, rating: int | None, corrected: bool,
                     first_on_event: bool) -> None:
        row = self.rows[user]
        row["feedback_events"] += first_on_event
        row["thumbs_up"] += thumbs == "up"
        row["thumbs"] += thumbs in ("up", "down")
        if rating is not None:
            row["rating_sum"] += rating
            row["ratings"] += 1
        row["corrections"] += corrected
        score = satisfaction(thumbs, rating)
        if score is not None:
            row["satisfaction_sum"] += score
            row["satisfaction_n"] += 1

    def add_score(self, user: str, method: str, score: float) -> None:
        row = self.rows[user]
        row[f"{method}_sum"] += score
        row[f"{method}_n"] += 1
