"""What is measured per user and arm, and how it is read from the store.

The user is the unit of randomisation, so it is the unit of analysis: every metric is a ratio of
per-user sums (thumbs-up per request = sum of a user's thumbs-up / sum of their requests), and its
variance comes from the delta method over users (`experiment.stats.ratio_estimate`). Treating one
user's ten requests as ten independent trials understates the variance and inflates false wins.

Assignment: a user belongs to the arm of their first request. A share change moves the users whose
bucket lies between the old and the new share to the other arm, and their treatment is mixed from
then on. Such users are left out of the comparison altogether, chosen by bucket and not by what they
did: every user first seen in a phase whose bucket a later phase's share puts on the other arm,
whether or not they came back. Leaving out only the later requests of those who did come back (as
this module did before) compares a control arm cut short at the ramp with a candidate arm that is
not, which reads any change over time as a treatment effect; leaving out only the users who came
back would drop the heavier users from one arm. Users seen in both arms are counted in `crossovers`.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from experiment.assignment import bucket, candidate_buckets
from experiment.phases import Phase, PhaseLocator, phases_of
from store.db import Database
from store.experiments import ExperimentNotFound, list_events
from store.models import AnswerScore, Experiment, Feedback, SearchEvent

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
    users: tuple[int, int]  # active users in the phase per arm they were served by then (control, candidate)


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
                     first_on_event: bool, times: int = 1) -> None:
        """One feedback row, or `times` rows alike (on events whose feedback is counted elsewhere)."""
        row = self.rows[user]
        row["feedback_events"] += first_on_event  # its event, once
        row["thumbs_up"] += (thumbs == "up") * times
        row["thumbs"] += (thumbs in ("up", "down")) * times
        if rating is not None:
            row["rating_sum"] += rating * times
            row["ratings"] += times
        row["corrections"] += corrected * times
        score = satisfaction(thumbs, rating)
        if score is not None:
            row["satisfaction_sum"] += score * times
            row["satisfaction_n"] += times

    def add_score(self, user: str, method: str, score: float) -> None:
        row = self.rows[user]
        row[f"{method}_sum"] += score
        row[f"{method}_n"] += 1


def collect(db: Database, experiment_id: str, *, cuped_lookback_days: float = 14.0,
            until: datetime | None = None) -> Collected:
    """Read an experiment's events, feedback and answer scores into per-user arrays per assigned arm.

    `until` reads the experiment as it stood at that moment (events and feedback up to it, answers scored by then).
    """
    return next(collect_at(db, experiment_id, [until], cuped_lookback_days=cuped_lookback_days))


def collect_at(db: Database, experiment_id: str, moments: Sequence[datetime | None], *,
               cuped_lookback_days: float = 14.0) -> Iterator[Collected]:
    """The experiment as it stood at each of `moments` (None: now), in turn, from one read of its rows.

    The report's metric-over-time chart analyses a dozen moments; reading once instead of once a moment
    made it ~N times cheaper at a million events (bench/evaluate_scale.py). A moment without a time zone is UTC.
    """
    moments = [None if moment is None else _utc(moment) for moment in moments]
    latest = None if None in moments else max(moments, default=None)
    experiment, events, feedback, scores = _read(db, experiment_id, latest)
    every_phase = phases_of(experiment, list_events(db, experiment_id))
    pre = (_pre_period(db, experiment.started_at, timedelta(days=cuped_lookback_days))
           if cuped_lookback_days > 0 else None)
    event_times = [row[1] for row in events]  # in time order
    for moment in moments:
        if moment is None:
            seen, phases = (events, feedback, scores), every_phase
        else:
            seen = (events[:bisect_right(event_times, moment)], [row for row in feedback if row[-1] <= moment],
                    [row for row in scores if row[-1] <= moment])  # scored later: not yet known then
            # As it stood then: a later share change had not yet moved anyone.
            phases = [phase for phase in every_phase if phase.start <= moment] or every_phase[:1]
        collected = _assemble(experiment, phases, *seen)
        if pre is not None:
            _attach_pre_period(collected, pre)
        yield collected


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _read(db: Database, experiment_id: str, until: datetime | None) -> tuple[Experiment, list, list, list]:
    """The experiment and its events (in time order), feedback and answer scores, each row ending in its time.

    Only the fields the sums need, computed in the database where it can (the total latency rather than the
    timings JSON, whether a correction exists rather than its text), read as plain rows: at a million events
    that is 2.6x faster than the whole JSON through the ORM (bench/evaluate_scale.py).
    """
    with db.session() as session:
        experiment = session.get(Experiment, experiment_id)
        if experiment is None:
            raise ExperimentNotFound(f"unknown experiment {experiment_id!r}")
        event_query = (
            select(SearchEvent.id, SearchEvent.ts, SearchEvent.user_id, SearchEvent.arm, SearchEvent.status,
                   SearchEvent.timings["total"].as_float(), SearchEvent.tokens_in, SearchEvent.tokens_out)
            .where(SearchEvent.experiment_id == experiment_id)
            .order_by(SearchEvent.ts, SearchEvent.id)
        )
        feedback_query = (
            select(Feedback.event_id, Feedback.thumbs, Feedback.rating, Feedback.corrected_answer.is_not(None),
                   Feedback.ts)
            .join(SearchEvent, SearchEvent.id == Feedback.event_id)
            .where(SearchEvent.experiment_id == experiment_id)
            .order_by(Feedback.ts, Feedback.id)
        )
        score_query = (
            select(AnswerScore.event_id, AnswerScore.method, AnswerScore.score, AnswerScore.created_at)
            .join(SearchEvent, SearchEvent.id == AnswerScore.event_id)
            .where(SearchEvent.experiment_id == experiment_id)
        )
        if until is not None:
            event_query = event_query.where(SearchEvent.ts <= until)
            feedback_query = feedback_query.where(Feedback.ts <= until)
            score_query = score_query.where(AnswerScore.created_at <= until)
        rows = session.connection()
        return (experiment, rows.execute(event_query).all(), rows.execute(feedback_query).all(),
                rows.execute(score_query).all())


def _assemble(experiment: Experiment, phases: list[Phase], events: Iterable, feedback: Iterable,
              scores: Iterable) -> Collected:
    import numpy as np

    locate = PhaseLocator(phases)
    moved = _moved_buckets(phases)
    first_arm: dict[str, str] = {}
    first_phase: dict[str, int] = {}
    left_out: set[str] = set()
    left_out_requests = 0
    sums = {arm: UserSums() for arm in ARMS}
    latencies: dict[str, list[float]] = {arm: [] for arm in ARMS}
    latency_users: dict[str, list[str]] = {arm: [] for arm in ARMS}
    phase_arm: list[dict[str, str]] = [{} for _ in phases]  # per phase: user -> arm first served there
    counted: dict[str, tuple[str, str]] = {}  # event id -> (arm, user) for events in the comparison
    crossed: set[str] = set()
    excluded = anonymous = 0
    for event_id, ts, user, arm, status, latency, tokens_in, tokens_out in events:
        if arm not in sums:
            continue
        if not user:
            anonymous += 1
            continue
        phase = locate(ts)
        phase_arm[phase].setdefault(user, arm)
        if user not in first_phase:
            first_phase[user] = phase
            low, high = moved[phase]
            if low <= bucket(experiment.salt, user) < high:
                left_out.add(user)
        home = first_arm.setdefault(user, arm)
        if arm != home:
            crossed.add(user)
        if user in left_out:
            left_out_requests += 1
            continue
        if arm != home:  # not by a share change (the bucket rule would have left them out): still mixed
            excluded += 1
            continue
        counted[event_id] = (arm, user)
        sums[arm].add_event(user, status, tokens_in, tokens_out)
        if latency is not None:
            latencies[arm].append(latency)
            latency_users[arm].append(user)
    seen_feedback: set[str] = set()
    for event_id, thumbs, rating, corrected, _ts in feedback:
        if event_id in counted:
            arm, user = counted[event_id]
            sums[arm].add_feedback(user, thumbs, rating, corrected, first_on_event=event_id not in seen_feedback)
            seen_feedback.add(event_id)
    for event_id, method, score, _created in scores:
        if event_id in counted and method in ("grounding", "judge"):
            arm, user = counted[event_id]
            sums[arm].add_score(user, method, float(score))
    arms = {}
    for arm in ARMS:
        rows = sums[arm].rows
        users = list(rows)
        # Each row is a dict made from COLUMNS, so its values are in COLUMNS' order: one table, then its columns.
        table = np.array([list(row.values()) for row in rows.values()], dtype=float).reshape(len(users), len(COLUMNS))
        columns = {c: table[:, n].copy() for n, c in enumerate(COLUMNS)}
        position = {user: n for n, user in enumerate(users)}
        arms[arm] = ArmUsers(user_ids=users, columns=columns, latencies_ms=np.asarray(latencies[arm], dtype=float),
                             strata=np.array([first_phase[u] for u in users], dtype=int),
                             latency_users=np.array([position[u] for u in latency_users[arm]], dtype=int))
    counts = []
    for phase, by_user in zip(phases, phase_arm, strict=True):
        served = list(by_user.values())
        counts.append(PhaseCount(phase, (served.count("control"), served.count("candidate"))))
    return Collected(experiment=experiment, arms=arms, phases=counts, crossovers=len(crossed),
                     excluded_requests=excluded, anonymous_requests=anonymous, left_out_requests=left_out_requests,
                     left_out_by_phase=dict(Counter(first_phase[user] for user in left_out)))


def _moved_buckets(phases: list[Phase]) -> list[tuple[int, int]]:
    """Per phase: the buckets [low, high) that this or a later phase's share puts on the other arm.

    A user first seen in phase k is on the candidate iff bucket < cut(share_k); they stay on one arm
    through every later phase iff their bucket is below every later cut or at or above all of them.
    """
    cuts = [candidate_buckets(phase.share) for phase in phases]
    return [(min(cuts[k:]), max(cuts[k:])) for k in range(len(cuts))]


def _pre_period(db: Database, started: datetime, lookback: timedelta) -> UserSums | None:
    """Each user's requests and feedback in the lookback before the experiment (None: nobody's): the columns
    the primary metrics read, counted in the database (a lookback holds as much traffic as the experiment)."""
    window = (SearchEvent.ts < started, SearchEvent.ts >= started - lookback, SearchEvent.user_id.is_not(None))
    with db.session() as session:
        requests = session.execute(
            select(SearchEvent.user_id, func.count()).where(*window).group_by(SearchEvent.user_id)).all()
        feedback = session.execute(
            select(SearchEvent.user_id, Feedback.thumbs, Feedback.rating, func.count())
            .join(Feedback, Feedback.event_id == SearchEvent.id).where(*window)
            .group_by(SearchEvent.user_id, Feedback.thumbs, Feedback.rating)).all()
    if not requests:
        return None
    pre = UserSums()
    for user, count in requests:
        pre.rows[user]["requests"] = count
    for user, thumbs, rating, count in feedback:
        pre.add_feedback(user, thumbs, rating, False, first_on_event=False, times=count)
    return pre


def _attach_pre_period(collected: Collected, pre: UserSums) -> None:
    """Each user's own pre-period value of each primary metric: the CUPED covariate (nan where none)."""
    import numpy as np

    for arm_users in collected.arms.values():
        ids = arm_users.user_ids
        for name in PRIMARY_METRICS:
            metric = METRICS[name]
            values = np.full(len(ids), np.nan)
            for n, user in enumerate(ids):
                row = pre.rows.get(user)
                if row and row[metric.denominator] > 0:
                    values[n] = row[metric.numerator] / row[metric.denominator]
            arm_users.pre[name] = values
