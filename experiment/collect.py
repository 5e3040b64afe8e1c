"""An experiment's rows, read from the store into per-user arrays per assigned arm (experiment.metrics says
what the arrays hold).

Assignment: a user belongs to the arm of their first request. A share change moves the users whose
bucket lies between the old and the new share to the other arm, and their treatment is mixed from
then on. Such users are left out of the comparison altogether, chosen by bucket and not by what they
did: every user first seen in a phase whose bucket a later phase's share puts on the other arm,
whether or not they came back. Leaving out only the later requests of those who did come back (as
this module did before) compares a control arm cut short at the ramp with a candidate arm that is
not, which reads any change over time as a treatment effect; leaving out only the users who came
back would drop the heavier users from one arm. Users seen in both arms are counted in `crossovers`.

The rows arrive in batches and become columns as they come (a code per user, microseconds since the
epoch as the database computes them, an arm and a status as small integers); the events are put in time order
here, and the sums per user are numpy's `bincount`. What a look costs at a million events, and what each of
these choices saved: docs/BENCHMARKS.md, "What one evaluation costs as the experiment grows".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Select, func, select, text

from experiment.assignment import bucket, candidate_buckets
from experiment.metrics import ARMS, COLUMNS, METRICS, PRIMARY_METRICS, ArmUsers, Collected, PhaseCount, satisfaction
from experiment.phases import Phase, locate, microseconds, phases_of
from store.db import Database
from store.experiments import ExperimentNotFound, list_events
from store.models import AnswerScore, Experiment, Feedback, SearchEvent
from store.types import epoch_microseconds

if TYPE_CHECKING:
    import numpy as np

_BATCH = 50_000  # rows a fetch (a server-side cursor on PostgreSQL)
_ERROR, _FALLBACK = 1, 2  # event status codes; any other status is 0
_SCORED = ("grounding", "judge")


def collect(db: Database, experiment_id: str, *, cuped_lookback_days: float = 14.0,
            until: datetime | None = None) -> Collected:
    """Read an experiment's events, feedback and answer scores into per-user arrays per assigned arm.

    `until` reads the experiment as it stood at that moment (events and feedback up to it, answers scored by then).
    """
    return next(collect_at(db, experiment_id, [until], cuped_lookback_days=cuped_lookback_days))


def collect_at(db: Database, experiment_id: str, moments: Sequence[datetime | None], *,
               cuped_lookback_days: float = 14.0) -> Iterator[Collected]:
    """The experiment as it stood at each of `moments` (None: now), in turn, from one read of its rows.

    The report's metric-over-time chart analyses a dozen moments: one read instead of one a moment. A moment
    without a time zone is UTC.
    """
    moments = [None if moment is None else _utc(moment) for moment in moments]
    latest = None if None in moments else max(moments, default=None)
    experiment, rows = _read(db, experiment_id, latest)
    every_phase = phases_of(experiment, list_events(db, experiment_id))
    # An event's phase among all of them is its phase at any moment it had happened by.
    event_phase = locate(every_phase, rows.events["ts"])
    pre = (_pre_period(db, experiment.started_at, timedelta(days=cuped_lookback_days))
           if cuped_lookback_days > 0 else None)
    covariates = {} if pre is None else _covariates(pre, rows.users)
    for moment in moments:
        # As it stood then: a later share change had not yet moved anyone.
        phases = (every_phase if moment is None
                  else [phase for phase in every_phase if phase.start <= moment] or every_phase[:1])
        yield _assemble(experiment, phases, rows, event_phase, None if moment is None else microseconds(moment),
                        covariates)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


@dataclass
class _Rows:
    """An experiment's events (in time order), feedback (in the order given) and answer scores (in the order
    scored) as columns. Users are codes into `users`, -1 for none; times are microseconds since the epoch."""

    users: list[str]
    buckets: np.ndarray  # per user code
    events: dict[str, np.ndarray]  # user, ts, arm (1: candidate), status, latency (nan: none), tokens_in, tokens_out
    feedback: dict[str, np.ndarray]  # user, arm, event_ts, event (a code per event), ts, and the per-row signals
    scores: dict[str, np.ndarray]  # user, arm, event_ts, judge (0: grounding), score, ts


def _read(db: Database, experiment_id: str, until: datetime | None) -> tuple[Experiment, _Rows]:
    """Only the fields the sums need, computed in the database where it can (the total latency rather than the
    timings JSON, whether a correction exists rather than its text)."""
    import numpy as np

    with db.session() as session:
        if db.engine.dialect.name == "postgresql":  # the three reads see one snapshot (SQLite's: see _assemble)
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            # Every row is read: plan for all of them, not for the first tenth as for a cursor by default. With
            # statistics that predate the experiment's rows, the default plan joined a million events to each
            # feedback row in a nested loop and had not answered after eight minutes (bench/evaluate_scale.py).
            session.execute(text("SET LOCAL cursor_tuple_fraction = 1.0"))
        experiment = session.get(Experiment, experiment_id)
        if experiment is None:
            raise ExperimentNotFound(f"unknown experiment {experiment_id!r}")
        this_experiment = (SearchEvent.experiment_id == experiment_id, SearchEvent.arm.in_(ARMS))
        event_query = (
            select(SearchEvent.user_id, epoch_microseconds(SearchEvent.ts), SearchEvent.arm, SearchEvent.status,
                   SearchEvent.timings["total"].as_float(), SearchEvent.tokens_in, SearchEvent.tokens_out)
            .where(*this_experiment)  # in no order: see _in_time_order
        )
        feedback_query = (
            select(SearchEvent.user_id, SearchEvent.arm, epoch_microseconds(SearchEvent.ts), Feedback.event_id,
                   Feedback.thumbs, Feedback.rating, Feedback.corrected_answer.is_not(None),
                   epoch_microseconds(Feedback.ts))
            .join(SearchEvent, SearchEvent.id == Feedback.event_id)
            .where(*this_experiment).order_by(Feedback.ts, Feedback.id)
        )
        score_query = (
            select(SearchEvent.user_id, SearchEvent.arm, epoch_microseconds(SearchEvent.ts), AnswerScore.method,
                   AnswerScore.score, epoch_microseconds(AnswerScore.created_at))
            .join(SearchEvent, SearchEvent.id == AnswerScore.event_id)
            .where(*this_experiment, AnswerScore.method.in_(_SCORED))
            .order_by(AnswerScore.created_at, AnswerScore.id)
        )
        if until is not None:
            event_query = event_query.where(SearchEvent.ts <= until)
            feedback_query = feedback_query.where(Feedback.ts <= until)
            score_query = score_query.where(AnswerScore.created_at <= until)
        connection = session.connection().execution_options(yield_per=_BATCH)
        codes: dict[str, int] = {}
        events = _columns(connection.execute(event_query).partitions(), lambda batch: _event_columns(batch, codes))
        requests_with_feedback: dict[str, int] = {}
        feedback = _columns(connection.execute(feedback_query).partitions(),
                            lambda batch: _feedback_columns(batch, codes, requests_with_feedback))
        scores = _columns(connection.execute(score_query).partitions(), lambda batch: _score_columns(batch, codes))
    events, users, recode = _in_time_order(events, list(codes))
    for columns in (events, feedback, scores):
        columns["user"] = recode[columns["user"]]
    buckets = np.array([bucket(experiment.salt, user) for user in users], dtype=np.int64)
    return experiment, _Rows(users=users, buckets=buckets, events=events, feedback=feedback, scores=scores)


def _in_time_order(events: dict[str, np.ndarray], users: list[str]
                   ) -> tuple[dict[str, np.ndarray], list[str], np.ndarray]:
    """The events in time order; the users in the order of their first event, and each old user code's new one
    (-1, anonymous, stays -1).

    Sorted here, not by the database: at a million events PostgreSQL's sort spilled to disk, 5.5 s of reading
    what takes 1.3 s unsorted. Ties are broken by the user and then every other column read, so the order is
    the same however the rows arrived: rows equal in all of them are interchangeable.
    """
    import numpy as np

    rank = np.empty(len(users) + 1, dtype=np.int64)  # by user id; the last place is the anonymous code -1's
    rank[np.argsort(np.array(users, dtype=object))] = np.arange(len(users))
    rank[-1] = -1
    order = np.lexsort([events[column] for column in ("tokens_out", "tokens_in", "latency", "status", "arm")]
                       + [rank[events["user"]], events["ts"]])
    events = {column: values[order] for column, values in events.items()}
    named = events["user"][events["user"] >= 0]
    present, first = np.unique(named, return_index=True)
    by_first_event = present[np.argsort(first)]
    recode = np.full(len(users) + 1, -1, dtype=np.int64)  # recode[-1]: anonymous stays -1
    recode[by_first_event] = np.arange(by_first_event.size)
    return events, [users[code] for code in by_first_event], recode


def _columns(batches: Iterable[Sequence[Any]], convert) -> dict[str, np.ndarray]:
    import numpy as np

    parts = [convert(list(zip(*batch, strict=True))) for batch in batches if batch]
    if not parts:
        return {name: array[:0] for name, array in convert(None).items()}
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _event_columns(columns: list[tuple] | None, codes: dict[str, int]) -> dict[str, np.ndarray]:
    import numpy as np

    user, ts, arm, status, latency, tokens_in, tokens_out = columns or ((),) * 7
    return {
        "user": _user_codes(user, codes, add=True), "ts": _times(ts), "arm": _arm_codes(arm),
        "status": np.array([_ERROR if s == "error" else _FALLBACK if s == "fallback" else 0 for s in status],
                           dtype=np.int8),
        "latency": np.array(latency, dtype=float),  # None: nan
        "tokens_in": np.nan_to_num(np.array(tokens_in, dtype=float)),  # None: 0
        "tokens_out": np.nan_to_num(np.array(tokens_out, dtype=float)),
    }


def _feedback_columns(columns: list[tuple] | None, codes: dict[str, int],
                      event_codes: dict[str, int]) -> dict[str, np.ndarray]:
    import numpy as np

    user, arm, event_ts, event_id, thumbs, rating, corrected, ts = columns or ((),) * 8
    return {
        "user": _user_codes(user, codes), "arm": _arm_codes(arm), "event_ts": _times(event_ts), "ts": _times(ts),
        "event": np.array([event_codes.setdefault(event, len(event_codes)) for event in event_id], dtype=np.int64),
        "corrections": np.array(corrected, dtype=float), **_signals(thumbs, rating),
    }


_SIGNALS = ("thumbs_up", "thumbs", "rating_sum", "ratings", "corrections", "satisfaction_sum", "satisfaction_n")


def _signals(thumbs: Sequence[str | None], rating: Sequence[int | None]) -> dict[str, np.ndarray]:
    """Per feedback row, what its thumb and rating add to each of its user's `_SIGNALS` columns (all but
    corrections, which the lookback does not need: no primary metric is a correction rate)."""
    import numpy as np

    scores = [satisfaction(t, r) for t, r in zip(thumbs, rating, strict=True)]
    return {
        "thumbs_up": np.array([t == "up" for t in thumbs], dtype=float),
        "thumbs": np.array([t in ("up", "down") for t in thumbs], dtype=float),
        "rating_sum": np.array([r or 0 for r in rating], dtype=float),
        "ratings": np.array([r is not None for r in rating], dtype=float),
        "satisfaction_sum": np.array([s or 0.0 for s in scores], dtype=float),
        "satisfaction_n": np.array([s is not None for s in scores], dtype=float),
    }


def _score_columns(columns: list[tuple] | None, codes: dict[str, int]) -> dict[str, np.ndarray]:
    import numpy as np

    user, arm, event_ts, method, score, ts = columns or ((),) * 6
    return {"user": _user_codes(user, codes), "arm": _arm_codes(arm), "event_ts": _times(event_ts), "ts": _times(ts),
            "judge": np.array([m == "judge" for m in method], dtype=bool), "score": np.array(score, dtype=float)}


def _user_codes(users: Sequence[str | None], codes: dict[str, int], add: bool = False) -> np.ndarray:
    """-1 for no user (anonymous) and, unless `add`, for a user none of the events read has."""
    import numpy as np

    if add:
        return np.array([codes.setdefault(user, len(codes)) if user else -1 for user in users], dtype=np.int64)
    return np.array([codes.get(user, -1) if user else -1 for user in users], dtype=np.int64)


def _times(moments: Sequence[int]) -> np.ndarray:
    import numpy as np

    return np.array(moments, dtype=np.int64)  # epoch_microseconds


def _arm_codes(arms: Sequence[str]) -> np.ndarray:
    import numpy as np

    return np.array([arm == "candidate" for arm in arms], dtype=np.int8)


def _assemble(experiment: Experiment, phases: list[Phase], rows: _Rows, event_phase: np.ndarray,
              moment: int | None, covariates: dict[str, np.ndarray]) -> Collected:
    """The experiment as it stood at `moment` (microseconds; None: everything read), in `phases` (those begun
    by then); `event_phase` is each event's index into them, `covariates` each user code's CUPED covariates."""
    import numpy as np

    events = rows.events
    n = events["ts"].size if moment is None else int(np.searchsorted(events["ts"], moment, side="right"))
    named = np.flatnonzero(events["user"][:n] >= 0)  # positions of the events with a user, in time order
    user, arm, phase = events["user"][named], events["arm"][named], event_phase[named]
    population = len(rows.users)
    present, first = np.unique(user, return_index=True)  # each user's first event (events are in time order)
    home = np.full(population, -1, dtype=np.int8)
    home[present] = arm[first]
    first_phase = np.full(population, -1, dtype=np.int64)
    first_phase[present] = phase[first]
    moved = np.array(_moved_buckets(phases), dtype=np.int64).reshape(-1, 2)
    left_out = np.zeros(population, dtype=bool)
    left_out[present] = ((moved[first_phase[present], 0] <= rows.buckets[present])
                         & (rows.buckets[present] < moved[first_phase[present], 1]))
    off_home = arm != home[user]
    crossed = np.unique(user[off_home]).size
    in_left_out = left_out[user]
    # Not by a share change (the bucket rule would have left them out): a user whose treatment is still mixed.
    excluded = off_home & ~in_left_out
    counted = ~in_left_out & ~excluded
    sums = _event_sums(events, named[counted], user[counted], population)
    # Feedback and scores count on the counted users' requests on their home arm, up to the last request read:
    # one written between the reads (SQLite's are not one snapshot) may be on a request that was not.
    eligible = (home >= 0) & ~left_out
    last = int(events["ts"][n - 1]) if n else -1
    _add_feedback(sums, rows.feedback, _counted(rows.feedback, moment, last, eligible, home), population)
    _add_scores(sums, rows.scores, _counted(rows.scores, moment, last, eligible, home), population)
    arms = {}
    for code, name in enumerate(ARMS):
        members = present[(home[present] == code) & ~left_out[present]]  # codes follow the users' first requests
        position = np.full(population, -1, dtype=np.int64)
        position[members] = np.arange(members.size)
        timed = named[counted & (arm == code)]
        timed = timed[~np.isnan(events["latency"][timed])]
        arms[name] = ArmUsers(user_ids=[rows.users[member] for member in members],
                              columns={column: sums[column][members] for column in COLUMNS},
                              latencies_ms=events["latency"][timed], strata=first_phase[members],
                              pre={name: values[members] for name, values in covariates.items()},
                              latency_users=position[events["user"][timed]])
    left_phases, left_counts = np.unique(first_phase[left_out], return_counts=True)
    return Collected(experiment=experiment, arms=arms,
                     phases=_phase_counts(phases, first_phase[present], home[present], phase, user, population),
                     crossovers=int(crossed), excluded_requests=int(excluded.sum()),
                     anonymous_requests=int(n - named.size), left_out_requests=int(in_left_out.sum()),
                     left_out_by_phase={int(k): int(v) for k, v in zip(left_phases, left_counts, strict=True)})


def _event_sums(events: dict[str, np.ndarray], at: np.ndarray, user: np.ndarray,
                population: int) -> dict[str, np.ndarray]:
    """Per user code, every column: the events' own, from the counted events at positions `at`; the rest 0."""
    import numpy as np

    def total(weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(user, weights=weights, minlength=population).astype(float)

    sums = {column: np.zeros(population) for column in COLUMNS}
    status = events["status"][at]
    sums.update(requests=total(), errors=total((status == _ERROR).astype(float)),
                fallbacks=total((status == _FALLBACK).astype(float)), tokens_in=total(events["tokens_in"][at]),
                tokens_out=total(events["tokens_out"][at]))
    return sums


def _counted(rows: dict[str, np.ndarray], moment: int | None, last: int, eligible: np.ndarray,
             home: np.ndarray) -> np.ndarray:
    """Positions of the feedback or score rows known at `moment`, on requests up to `last`, of `eligible` users
    on their `home` arm."""
    import numpy as np

    k = rows["ts"].size if moment is None else int(np.searchsorted(rows["ts"], moment, side="right"))
    user = rows["user"][:k]
    known = np.maximum(user, 0)  # -1 (no such user) is dropped by the first condition
    return np.flatnonzero((user >= 0) & (rows["event_ts"][:k] <= last) & eligible[known]
                          & (rows["arm"][:k] == home[known]))


def _add_feedback(sums: dict[str, np.ndarray], feedback: dict[str, np.ndarray], at: np.ndarray,
                  population: int) -> None:
    """Each signal per row, and each request once however many feedback rows it got (`feedback_events`)."""
    import numpy as np

    who = feedback["user"][at]
    for column in _SIGNALS:
        sums[column] += np.bincount(who, weights=feedback[column][at], minlength=population)
    _requests, once = np.unique(feedback["event"][at], return_index=True)
    sums["feedback_events"] += np.bincount(who[once], minlength=population)


def _add_scores(sums: dict[str, np.ndarray], scores: dict[str, np.ndarray], at: np.ndarray, population: int) -> None:
    import numpy as np

    for method, judged in (("grounding", False), ("judge", True)):
        mine = at[scores["judge"][at] == judged]
        sums[f"{method}_sum"] += np.bincount(scores["user"][mine], weights=scores["score"][mine], minlength=population)
        sums[f"{method}_n"] += np.bincount(scores["user"][mine], minlength=population)


def _phase_counts(phases: list[Phase], first_phase: np.ndarray, home: np.ndarray, phase: np.ndarray,
                  user: np.ndarray, population: int) -> list[PhaseCount]:
    """Per phase, the users first seen in it by the arm they were assigned then (their first request's), and
    all the users active in it.

    Only first exposures test the split: whether a user comes back in a later phase depends on how the arm
    treated them, so counting returning users would read a candidate that drives users away as a broken split.
    A rollout step's exposure is everyone it served, returning users too (a step of a closed population has
    no new users at all).
    """
    import numpy as np

    assigned = np.bincount(first_phase * 2 + home, minlength=2 * len(phases)).reshape(-1, 2)
    active = np.bincount(np.unique(phase * population + user) // population, minlength=len(phases))
    return [PhaseCount(p, (int(assigned[k, 0]), int(assigned[k, 1])), int(active[k])) for k, p in enumerate(phases)]


def _moved_buckets(phases: list[Phase]) -> list[tuple[int, int]]:
    """Per phase: the buckets [low, high) that this or a later phase's share puts on the other arm.

    A user first seen in phase k is on the candidate iff bucket < cut(share_k); they stay on one arm
    through every later phase iff their bucket is below every later cut or at or above all of them.
    """
    cuts = [candidate_buckets(phase.share) for phase in phases]
    return [(min(cuts[k:]), max(cuts[k:])) for k in range(len(cuts))]


@dataclass
class _PrePeriod:
    """Per user with requests in the lookback: their index into `columns` (requests, `_SIGNALS` but corrections, and
    the scores' sums and counts)."""

    index: dict[str, int]
    columns: dict[str, np.ndarray]


def _lookback_queries(started: datetime, lookback: timedelta) -> tuple[Select, Select, Select]:
    """The lookback's requests, feedback and answer scores, counted in the database by user and kind (a lookback
    holds as much traffic as the experiment)."""
    window = (SearchEvent.ts < started, SearchEvent.ts >= started - lookback, SearchEvent.user_id.is_not(None))
    return (
        select(SearchEvent.user_id, func.count()).where(*window).group_by(SearchEvent.user_id),
        select(SearchEvent.user_id, Feedback.thumbs, Feedback.rating, func.count())
        .join(Feedback, Feedback.event_id == SearchEvent.id).where(*window)
        .group_by(SearchEvent.user_id, Feedback.thumbs, Feedback.rating),
        select(SearchEvent.user_id, AnswerScore.method, func.sum(AnswerScore.score), func.count())
        .join(AnswerScore, AnswerScore.event_id == SearchEvent.id).where(*window, AnswerScore.method.in_(_SCORED))
        .group_by(SearchEvent.user_id, AnswerScore.method),
    )


def _pre_period(db: Database, started: datetime, lookback: timedelta) -> _PrePeriod | None:
    """Each user's requests, feedback and answer scores in the lookback before the experiment (None: nobody's).

    Scores in a lookback are those of an earlier experiment's sample (the scoring flow samples only an
    experiment's own events): its users' history for a primary answer score, as their feedback is for the rest.
    """
    import numpy as np

    with db.session() as session:
        requests, feedback, scores = (session.execute(query).all() for query in _lookback_queries(started, lookback))
    if not requests:
        return None
    index = {user: n for n, (user, _count) in enumerate(requests)}
    columns = {"requests": np.array([count for _user, count in requests], dtype=float)}

    def by_user(rows: list) -> tuple[np.ndarray, np.ndarray]:  # a row's request is in the same window
        return (np.array([index[row[0]] for row in rows], dtype=np.int64),
                np.array([row[-1] for row in rows], dtype=float))

    who, count = by_user(feedback)
    for column, per_row in _signals([row[1] for row in feedback], [row[2] for row in feedback]).items():
        columns[column] = np.bincount(who, weights=per_row * count, minlength=len(index))
    for method in _SCORED:
        mine = [row for row in scores if row[1] == method]
        who, count = by_user(mine)
        columns[f"{method}_sum"] = np.bincount(who, weights=np.array([row[2] for row in mine], dtype=float),
                                               minlength=len(index))
        columns[f"{method}_n"] = np.bincount(who, weights=count, minlength=len(index))
    return _PrePeriod(index, columns)


def _covariates(pre: _PrePeriod, users: list[str]) -> dict[str, np.ndarray]:
    """Each primary metric's CUPED covariate per user code: the user's own value before (nan where none)."""
    import numpy as np

    at = np.array([pre.index.get(user, -1) for user in users], dtype=np.int64)
    found = at >= 0
    covariates = {}
    for name in PRIMARY_METRICS:
        metric = METRICS[name]
        num, den = (np.where(found, pre.columns[c][np.maximum(at, 0)], 0.0)
                    for c in (metric.numerator, metric.denominator))
        values = np.full(at.size, np.nan)
        np.divide(num, den, out=values, where=den > 0)
        covariates[name] = values
    return covariates
