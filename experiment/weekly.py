"""Week over week: this week against last week, per assigned arm and overall, for the weekly report.

Per group (overall, control, candidate) and week: requests, users, thumbs-up per request, mean rating, feedback rate,
answer score, latency p95, errors and fallbacks, and the change from last week in percent. The user is the unit, as
everywhere in the experiment engine: a rate is a ratio of per-user sums (`metrics.UserSums`, the sums the experiment
analysis uses) with its delta-method variance (`stats.ratio_estimate`), and the change of a rate is
`stats.relative_change`, the delta method on the ratio of the two weeks' estimates, with its 95% interval. Counts and
latency get the change without an interval (the latency is a quantile over requests, not a ratio over users).

What the numbers assume:
- The two weeks are treated as independent samples, yet a returning user is in both. A user's weeks are usually
  positively correlated (the same person asks alike and rates alike), which makes the true variance of the change
  smaller than the independent sum: the intervals are then conservative (wider than needed). Only if users' weeks
  were negatively correlated would they be too narrow.
- Per arm means per *assigned* arm, whatever experiment assigned it: after a promotion, this week's control can be
  another model than last week's (`experiments` lists what each week ran). A user assigned to both arms within a
  week (a new experiment brings a new salt) counts in each; overall, once.
- Requests without a user id cannot be attributed to a user: they are counted (`anonymous_requests`) and left out
  of the per-user figures, as in the experiment analysis.

Also gathered: the queries to review (lowest-rated, lowest answer score, no retrieval hits), figures per prompt
template version, and how much of the traffic came from simulated users (`sim-`), which the report says loudly.

`week_over_week(db)` returns a JSON-ready bundle; importing this module is cheap (numpy and scipy load when it runs).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from experiment.metrics import ARMS, COLUMNS, METRICS, UserSums, satisfaction
from experiment.report import SIMULATED_PREFIX
from store.db import Database
from store.models import AnswerScore, Experiment, Feedback, PromptTemplate, SearchEvent, utcnow

if TYPE_CHECKING:
    from experiment.stats import Estimate

WEEK = timedelta(days=7)
ALPHA = 0.05
GROUPS = ("overall", *ARMS)
_PAIR = ("last", "this")  # the two weeks, oldest first
RATES = ("thumbs_up_per_request", "mean_rating", "feedback_rate", "answer_score", "error_rate", "fallback_rate")
COUNTS = ("requests", "users", "errors", "fallbacks")
MISSES = 10  # queries per review list
LOW_SATISFACTION = 0.25  # a thumbs down, or a rating of 2 or less (metrics.satisfaction)
LOW_SCORE = 0.5  # answer scores are 0..1
_BATCH = 5000  # rows per fetch: a week of traffic is streamed, never held as rows


@dataclass(frozen=True)
class Weeks:
    """Two adjacent weeks of whole UTC days: last = [last_start, this_start), this = [this_start, end)."""

    last_start: datetime
    this_start: datetime
    end: datetime

    @property
    def ending(self) -> date:
        return (self.end - timedelta(days=1)).date()

    def which(self, moment: datetime) -> str | None:
        if self.this_start <= moment < self.end:
            return "this"
        return "last" if self.last_start <= moment < self.this_start else None

    def to_dict(self) -> dict[str, Any]:
        return {"ending": self.ending.isoformat(),
                "this": [self.this_start.isoformat(), self.end.isoformat()],
                "last": [self.last_start.isoformat(), self.this_start.isoformat()]}


def parse_week_ending(text: str | None) -> date | None:
    """`YYYY-MM-DD` (the last day of the week) or None; a ValueError naming the parameter otherwise."""
    if text is None or text == "":
        return None
    try:
        return date.fromisoformat(text)
    except (TypeError, ValueError):
        raise ValueError(f"week_ending must be a date YYYY-MM-DD, got {str(text)[:40]!r}") from None


def weeks_ending(week_ending: date | None = None, now: datetime | None = None) -> Weeks:
    """The seven UTC days that end with `week_ending` (default: yesterday, so a Monday run covers Monday to Sunday)
    and the seven days before them."""
    last_day = week_ending or ((now or utcnow()).date() - timedelta(days=1))
    end = datetime.combine(last_day + timedelta(days=1), time(), tzinfo=UTC)
    return Weeks(last_start=end - 2 * WEEK, this_start=end - WEEK, end=end)


def week_over_week(db: Database, week_ending: date | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Everything the weekly report shows, JSON-ready (see the module docstring for what is computed how)."""
    weeks = weeks_ending(week_ending, now)
    tally = _Tally(weeks)
    _read(db, weeks, tally)
    weekly = {name: {week: _Figures.of(tally.groups[week][name]) for week in _PAIR} for name in GROUPS}
    return {
        "kind": "weekly",
        "generated_at": utcnow().isoformat(),
        "week": weeks.to_dict(),
        "groups": {name: {"last": figures["last"].to_dict(), "this": figures["this"].to_dict(),
                          "change": _changes(figures["last"], figures["this"])}
                   for name, figures in weekly.items()},
        "days": {week: [_day(weeks, week, n, tally.days[week][n]) for n in range(7)] for week in _PAIR},
        "templates": _templates(db, tally),
        "misses": _misses(db, tally),
        "simulated": tally.simulated_summary(),
        "anonymous_requests": dict(tally.anonymous),
        "experiments": _experiments(db, tally.experiments),
    }


@dataclass
class _Group:
    """One group's per-user sums and per-request latencies in one week."""

    sums: UserSums = field(default_factory=UserSums)
    latencies: list[float] = field(default_factory=list)


@dataclass
class _Miss:
    """One query in a review list (its spellings grouped): how often it missed, and its worst event, as asked."""

    query: str = ""
    events: int = 0  # requests, however many feedback rows or scores each brought
    simulated_events: int = 0
    worst: float = float("inf")
    event_id: str | None = None
    arm: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set, repr=False)

    def add(self, value: float, query: str, event_id: str, arm: str | None, simulated: bool, **detail: Any) -> None:
        if event_id not in self._seen:  # a thumbs-down and a low rating on one request: one request
            self._seen.add(event_id)
            self.events += 1
            self.simulated_events += simulated
        if value < self.worst:
            self.worst, self.query, self.event_id, self.arm, self.detail = value, query, event_id, arm, detail


class _Tally:
    """Per week: the groups' sums, each day's and each prompt template's, the review lists and the simulated share."""

    def __init__(self, weeks: Weeks) -> None:
        self.weeks = weeks
        self.groups = {week: {name: _Group() for name in GROUPS} for week in _PAIR}
        self.days = {week: [_Group() for _ in range(7)] for week in _PAIR}
        self.templates: dict[str, dict[tuple[str | None, int | None], _Group]] = {
            week: defaultdict(_Group) for week in _PAIR}
        self.misses: dict[str, dict[str, _Miss]] = {kind: {} for kind in ("lowest_rated", "lowest_score", "no_hits")}
        self.anonymous: Counter[str] = Counter({"last": 0, "this": 0})
        self.counts: dict[str, Counter[str]] = {week: Counter() for week in _PAIR}
        self.simulated_users: dict[str, set[str]] = {week: set() for week in _PAIR}
        self.experiments: dict[str | None, Counter[str]] = defaultdict(Counter)
        self._seen_feedback: set[str] = set()

    def _targets(self, week: str, ts: datetime, arm: str, template: tuple[str | None, int | None]) -> list[_Group]:
        start = self.weeks.this_start if week == "this" else self.weeks.last_start
        targets = [self.groups[week]["overall"], self.days[week][(ts - start).days],
                   self.templates[week][template]]
        if arm in ARMS:
            targets.append(self.groups[week][arm])
        return targets

    def event(self, event_id: str, ts: datetime, user: str | None, arm: str, status: str, timings: dict | None,
              tokens_in: int | None, tokens_out: int | None, retrieved: dict | None, template_id: str | None,
              template_version: int | None, query: str, experiment_id: str | None) -> None:
        week = self.weeks.which(ts)
        if week is None:
            return
        simulated = _simulated(user)
        self.counts[week]["events"] += 1
        self.counts[week]["simulated_events"] += simulated
        if simulated:
            self.simulated_users[week].add(user)
        self.experiments[experiment_id][week] += 1
        if week == "this" and status != "error" and not (retrieved or {}).get("ids"):
            self._miss("no_hits", query).add(0.0, query, event_id, arm, simulated)
        if not user:
            self.anonymous[week] += 1
            return
        latency = (timings or {}).get("total")
        for group in self._targets(week, ts, arm, (template_id, template_version)):
            group.sums.add_event(user, status, tokens_in, tokens_out)
            if latency is not None:
                group.latencies.append(float(latency))

    def feedback(self, event_id: str, thumbs: str | None, rating: int | None, corrected: str | None,
                 comment: str | None, ts: datetime, user: str | None, arm: str, template_id: str | None,
                 template_version: int | None, query: str) -> None:
        week = self.weeks.which(ts)
        if week is None:
            return
        simulated = _simulated(user)
        self.counts[week]["feedback"] += 1
        self.counts[week]["simulated_feedback"] += simulated
        score = satisfaction(thumbs, rating)
        if week == "this" and score is not None and score <= LOW_SATISFACTION:
            self._miss("lowest_rated", query).add(score, query, event_id, arm, simulated, thumbs=thumbs,
                                                  rating=rating, corrected_answer=corrected, comment=comment)
        first = event_id not in self._seen_feedback
        self._seen_feedback.add(event_id)
        if not user:
            return
        for group in self._targets(week, ts, arm, (template_id, template_version)):
            group.sums.add_feedback(user, thumbs, rating, corrected is not None, first_on_event=first)

    def score(self, event_id: str, method: str, score: float, ts: datetime, user: str | None, arm: str,
              template_id: str | None, template_version: int | None, query: str) -> None:
        week = self.weeks.which(ts)
        if week is None or method not in ("grounding", "judge"):
            return
        if week == "this" and score < LOW_SCORE:
            self._miss("lowest_score", query).add(float(score), query, event_id, arm, _simulated(user),
                                                  method=method)
        if not user:
            return
        for group in self._targets(week, ts, arm, (template_id, template_version)):
            group.sums.add_score(user, method, float(score))

    def _miss(self, kind: str, query: str) -> _Miss:
        key = " ".join(query.split()).casefold()  # the same question asked with other spacing or case
        return self.misses[kind].setdefault(key, _Miss())

    def simulated_summary(self) -> dict[str, dict[str, Any]]:
        """Per week and for both: the counts `report.content._simulated_text` words into its banner."""
        out = {}
        for week in (*_PAIR, "both"):
            weeks = _PAIR if week == "both" else (week,)
            counts = sum((self.counts[w] for w in weeks), Counter())
            users = set().union(*(self.simulated_users[w] for w in weeks))
            events, simulated = counts["events"], counts["simulated_events"]
            out[week] = {"events": events, "simulated_events": simulated, "simulated_users": len(users),
                         "feedback": counts["feedback"], "simulated_feedback": counts["simulated_feedback"],
                         "any": simulated > 0, "all": events > 0 and simulated == events}
        return out


def _simulated(user: str | None) -> bool:
    return bool(user) and user.startswith(SIMULATED_PREFIX)


def _read(db: Database, weeks: Weeks, tally: _Tally) -> None:
    """Stream the two weeks' events, their feedback and their answer scores into the tally (one pass each)."""
    window = (SearchEvent.ts >= weeks.last_start, SearchEvent.ts < weeks.end)
    context = (SearchEvent.ts, SearchEvent.user_id, SearchEvent.arm, SearchEvent.prompt_template_id,
               SearchEvent.prompt_template_version, SearchEvent.query)
    events = select(SearchEvent.id, SearchEvent.ts, SearchEvent.user_id, SearchEvent.arm, SearchEvent.status,
                    SearchEvent.timings, SearchEvent.tokens_in, SearchEvent.tokens_out, SearchEvent.retrieved,
                    SearchEvent.prompt_template_id, SearchEvent.prompt_template_version, SearchEvent.query,
                    SearchEvent.experiment_id).where(*window)
    # Feedback in arrival order, so that the first row on an event is the one that counts for the feedback rate.
    feedback = (select(Feedback.event_id, Feedback.thumbs, Feedback.rating, Feedback.corrected_answer,
                       Feedback.comment, *context)
                .join(SearchEvent, SearchEvent.id == Feedback.event_id).where(*window)
                .order_by(Feedback.ts, Feedback.id))
    scores = (select(AnswerScore.event_id, AnswerScore.method, AnswerScore.score, *context)
              .join(SearchEvent, SearchEvent.id == AnswerScore.event_id).where(*window))
    with db.session() as session:
        for statement, add in ((events, tally.event), (feedback, tally.feedback), (scores, tally.score)):
            for row in session.execute(statement.execution_options(yield_per=_BATCH)):
                add(*row)


@dataclass
class _Figures:
    """One group in one week: totals, the rates as estimates, latency quantiles."""

    totals: dict[str, int]
    rates: dict[str, Estimate]
    latency: dict[str, float | None]

    @classmethod
    def of(cls, group: _Group) -> _Figures:
        import numpy as np

        from experiment import stats

        rows = list(group.sums.rows.values())
        columns = {c: np.array([row[c] for row in rows], dtype=float) for c in COLUMNS}
        totals = {"users": len(rows), **{c: int(columns[c].sum()) for c in (
            "requests", "errors", "fallbacks", "thumbs", "thumbs_up", "ratings", "feedback_events", "grounding_n",
            "tokens_in", "tokens_out")}}
        rates = {name: stats.ratio_estimate(columns[METRICS[name].numerator], columns[METRICS[name].denominator])
                 for name in RATES}
        latencies = np.asarray(group.latencies, dtype=float)
        latency = {f"latency_p{q}_ms": float(np.percentile(latencies, q)) if latencies.size else None
                   for q in (50, 95)}
        return cls(totals, rates, latency)

    def to_dict(self) -> dict[str, Any]:
        return {**self.totals, **self.latency, **{name: _estimate(e) for name, e in self.rates.items()}}

    def value(self, key: str) -> float | None:
        if key in self.rates:
            return _finite(self.rates[key].value)
        return self.totals.get(key, self.latency.get(key))


def _estimate(estimate: Estimate) -> dict[str, Any]:
    """A rate with its 95% interval (normal, from the delta-method standard error); None where undefined."""
    value, se = _finite(estimate.value), _finite(estimate.std_error())
    z = NormalDist().inv_cdf(1 - ALPHA / 2)
    ci = [value - z * se, value + z * se] if value is not None and se is not None else None
    return {"value": value, "ci": ci, "std_error": se, "users": estimate.users}


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _changes(last: _Figures, this: _Figures) -> dict[str, dict[str, Any]]:
    """The change from last week, relative (0.1 = +10%): with an interval for the rates, a point for the rest."""
    from experiment import stats

    lower_is_better = {"errors", "fallbacks", "latency_p95_ms"}
    out: dict[str, dict[str, Any]] = {}
    for key in (*COUNTS, "latency_p95_ms"):
        out[key] = {"relative": _relative(last.value(key), this.value(key)),
                    "higher_is_better": False if key in lower_is_better else None}
    for name in RATES:
        change = stats.relative_change(last.rates[name], this.rates[name], ALPHA)
        if change is not None:  # every rate here is >= 0, so it cannot fall by more than 100%
            change["ci"][0] = max(change["ci"][0], -1.0)
        out[name] = dict(change or {"relative": _relative(last.value(name), this.value(name))},
                         higher_is_better=METRICS[name].higher_is_better)
    return out


def _relative(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None or before == 0 else after / before - 1


def _day(weeks: Weeks, week: str, n: int, group: _Group) -> dict[str, Any]:
    start = weeks.this_start if week == "this" else weeks.last_start
    figures = _Figures.of(group)
    return {"date": (start + timedelta(days=n)).date().isoformat(), "requests": figures.totals["requests"],
            "users": figures.totals["users"],
            "thumbs_up_per_request": _estimate(figures.rates["thumbs_up_per_request"])}


def _templates(db: Database, tally: _Tally) -> list[dict[str, Any]]:
    """This week per prompt template version, busiest first, with the change of thumbs-up per request."""
    from experiment import stats

    this, last = tally.templates["this"], tally.templates["last"]
    ids = {template_id for template_id, _version in this if template_id}
    with db.session() as session:
        names = dict(session.execute(select(PromptTemplate.id, PromptTemplate.name)
                                     .where(PromptTemplate.id.in_(ids))).all()) if ids else {}
    rows = []
    for (template_id, version), group in this.items():
        figures = _Figures.of(group)
        requests = figures.totals["requests"]
        before = last.get((template_id, version))
        change = (stats.relative_change(_Figures.of(before).rates["thumbs_up_per_request"],
                                        figures.rates["thumbs_up_per_request"], ALPHA) if before else None)
        rows.append({
            "template_id": template_id, "version": version, "name": names.get(template_id),
            "users": figures.totals["users"], "requests": requests,
            "tokens_in_per_request": figures.totals["tokens_in"] / requests if requests else None,
            "tokens_out_per_request": figures.totals["tokens_out"] / requests if requests else None,
            **figures.latency,
            **{name: _estimate(figures.rates[name]) for name in ("thumbs_up_per_request", "mean_rating",
                                                                 "feedback_rate")},
            "thumbs_up_change": change,
        })
    # Versions of one name side by side, oldest first; the id only parts templates whose name is unknown.
    return sorted(rows, key=lambda r: (-r["requests"], r["name"] or "", r["version"] or 0, r["template_id"] or ""))


def _misses(db: Database, tally: _Tally) -> dict[str, list[dict[str, Any]]]:
    """The review lists, worst first (no hits: most frequent first), with the worst event's answer."""
    def worst_first(miss: _Miss) -> tuple:
        return miss.worst, -miss.events, miss.query

    order = {"lowest_rated": worst_first, "lowest_score": worst_first, "no_hits": lambda m: (-m.events, m.query)}
    chosen = {kind: sorted(misses.values(), key=order[kind])[:MISSES] for kind, misses in tally.misses.items()}
    event_ids = {m.event_id for misses in chosen.values() for m in misses}
    with db.session() as session:
        rows = session.execute(select(SearchEvent.id, SearchEvent.ts, SearchEvent.answer, SearchEvent.status)
                               .where(SearchEvent.id.in_(event_ids))).all() if event_ids else []
    events = {event_id: (ts, answer, status) for event_id, ts, answer, status in rows}
    out = {}
    for kind, misses in chosen.items():
        out[kind] = []
        for miss in misses:
            ts, answer, status = events.get(miss.event_id, (None, None, None))
            out[kind].append({"query": miss.query, "events": miss.events, "simulated_events": miss.simulated_events,
                              "worst": None if kind == "no_hits" else miss.worst, "event_id": miss.event_id,
                              "arm": miss.arm, "ts": ts.isoformat() if ts else None, "status": status,
                              "answer": answer, **miss.detail})
    return out


def _experiments(db: Database, events: dict[str | None, Counter[str]]) -> list[dict[str, Any]]:
    """The experiments whose events are in the two weeks, with their arms' models: what each arm meant then."""
    from experiment.status import arms_of

    ids = [experiment_id for experiment_id in events if experiment_id]
    with db.session() as session:
        found = session.scalars(select(Experiment).where(Experiment.id.in_(ids))).all() if ids else []
    rows = [{"id": e.id, "status": e.status, "candidate_share": e.candidate_share, **arms_of(e),
             "events": {"last": events[e.id]["last"], "this": events[e.id]["this"]},
             "started_at": e.started_at.isoformat()} for e in found]
    return sorted(rows, key=lambda r: r["started_at"])
