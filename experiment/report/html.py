"""The operator report of one experiment: one self-contained HTML file, and the same content as markdown.

An operator decides from this page whether to trust a promotion or a roll back, so it shows the
verdict first and then everything behind it: the primary metric over time with its always-valid
band, every metric with its interval, guardrails, rollout transitions, the per-phase sample-ratio
check, real answers side by side and the adapter's offline gate.

The file must open anywhere (a laptop on a plane, an artifact store, an email attachment), so it
has no JavaScript and references nothing outside itself: CSS is inline and the charts are SVG
drawn here. Queries, answers, model names and reasons come from users or models, so every piece
of text is escaped.

`gather` reads the store (through the analysis and the store's queries) into a JSON-ready bundle;
`render_html` and `to_markdown` are pure functions of that bundle.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from experiment.decision import KEEP_RUNNING, NOT_ENOUGH_DATA, PROMOTE, ROLL_BACK, Policy
from experiment.metrics import ARMS, METRICS
from store.db import Database
from store.experiments import RUNNING, get, get_running, list_events, list_experiments
from store.models import Adapter, Experiment, Feedback, SearchEvent, utcnow

# The demo's simulator labels its users so (training.dataset.SIMULATED_USER_PREFIX; `experiment` may not import it).
SIMULATED_PREFIX = "sim-"
SIMULATED_BANNER = "Traffic and feedback in this experiment were SIMULATED (sim- users); no person rated anything"
EXAMPLES = 4
ANSWER_CHARS = 400
SHARE_KINDS = ("share", "rollout_step")
END_KINDS = ("promoted", "rolled_back", "stopped")

_VERDICTS = {  # action -> (headline, css class)
    PROMOTE: ("Promote the candidate", "good"),
    ROLL_BACK: ("Roll back the candidate", "bad"),
    KEEP_RUNNING: ("Keep running", "warn"),
    NOT_ENOUGH_DATA: ("Not enough data", "muted"),
}
_PERCENT = {"thumbs_up_per_request", "thumbs_up_rate", "feedback_rate", "correction_rate", "error_rate",
            "fallback_rate"}
_BOUNDS = {"mean_rating": (1.0, 5.0), "tokens_out_per_request": (0.0, math.inf)}  # default: a 0..1 ratio
_ARM_ROWS = (  # the per-arm figures table: key, label, formatter name
    ("users", "users", "int"), ("requests", "requests", "int"), ("thumbs", "thumbs given", "int"),
    ("ratings", "ratings given", "int"), ("satisfaction", "satisfaction", "satisfaction"),
    ("thumbs_up_per_request", "thumbs-up per request", "thumbs_up_per_request"),
    ("thumbs_up_rate", "thumbs-up rate (responders)", "thumbs_up_rate"),
    ("feedback_rate", "feedback rate", "feedback_rate"), ("mean_rating", "mean rating", "mean_rating"),
    ("correction_rate", "correction rate", "correction_rate"), ("error_rate", "error rate", "error_rate"),
    ("fallback_rate", "fallback rate", "fallback_rate"), ("answer_score", "answer score", "answer_score"),
    ("latency_p50_ms", "latency p50", "latency_p95_ms"), ("latency_p95_ms", "latency p95", "latency_p95_ms"),
    ("tokens_in", "tokens in", "int"), ("tokens_out", "tokens out", "int"),
)
METHOD_NOTES = (
    "The user is the unit of analysis, as of randomisation: a user belongs to the arm of their first request, "
    "and every metric is a ratio of per-user sums.",
    "Variances of those ratios come from the delta method over users, so one user's many requests are not "
    "counted as independent trials.",
    "Decisions read only always-valid 95% intervals (asymptotic confidence sequences, Waudby-Smith et al. 2023; "
    "as GrowthBook's sequential engine): evaluating every hour does not inflate false decisions.",
    "Fixed-horizon p-values are shown for reference only: they are not valid under repeated looks and never decide.",
    "CUPED: where users gave feedback in the 14 days before the experiment, that pre-period value is a covariate "
    "(regression adjustment), which narrows intervals without bias.",
    "Guardrails are one-sided tests against a margin on the always-valid interval, checked only after the minimum "
    "sample. The sample-ratio check is a chi-square per phase against that phase's share (p < 0.001 flags it).",
)


# --------------------------------------------------------------------------------------------------- gather


def gather(db: Database, experiment_id: str | None = None, policy: Policy | None = None,
           points: int = 12) -> dict[str, Any]:
    """Everything the report shows, JSON-ready. Default experiment: see `_choose`."""
    from experiment.analysis import analyse, empty, timeline  # numpy and scipy: only when gathering

    policy = policy or Policy()
    experiment, selection = _choose(db, experiment_id)
    bundle: dict[str, Any] = {"generated_at": utcnow().isoformat(), "selection": selection, "experiment": None,
                              "analysis": None, "timeline": [], "transitions": [], "examples": None,
                              "offline_gate": None, "simulated": None}
    if experiment is None:
        bundle["analysis"] = empty(selection, policy).to_dict()
        return bundle
    bundle["experiment"] = _describe(experiment)
    bundle["analysis"] = analyse(db, experiment.id, policy).to_dict()
    if experiment.candidate_base_url:  # without a candidate there is no comparison to draw
        bundle["timeline"] = timeline(db, experiment.id, policy, points)
    bundle["transitions"] = _transitions(db, experiment.id)
    bundle["simulated"] = _simulated(db, experiment.id)
    bundle["examples"] = _examples(db, experiment.id)
    bundle["offline_gate"] = _offline_gate(db, experiment.candidate_adapter_id)
    return bundle


def _choose(db: Database, experiment_id: str | None) -> tuple[Experiment | None, str]:
    """The experiment to report on, and why that one.

    Right after a promotion the running experiment has no candidate; the report is then about the
    last real comparison: the most recently ended experiment that had a candidate.
    """
    if experiment_id is not None:
        return get(db, experiment_id), "the experiment asked for"
    running = get_running(db)
    if running is not None and running.candidate_base_url:
        return running, "the running experiment"
    for candidate in list_experiments(db, limit=100):
        if candidate.status != RUNNING and candidate.candidate_base_url:
            why = "the running experiment has no candidate" if running else "no experiment is running"
            return candidate, f"the last ended experiment that compared two arms ({why})"
    if running is not None:
        return running, "the running experiment (it has no candidate arm)"
    return None, "no experiment in the store"


def _describe(experiment: Experiment) -> dict[str, Any]:
    def arm(base_url: str | None, model: str | None, adapter_id: str | None) -> dict[str, Any] | None:
        return None if not base_url else {"base_url": base_url, "model": model, "adapter_id": adapter_id}

    return {
        "id": experiment.id,
        "status": experiment.status,
        "control": arm(experiment.control_base_url, experiment.control_model, experiment.control_adapter_id),
        "candidate": arm(experiment.candidate_base_url, experiment.candidate_model, experiment.candidate_adapter_id),
        "candidate_share": experiment.candidate_share,
        "primary_metric": experiment.primary_metric,
        "started_at": _iso(experiment.started_at),
        "ended_at": _iso(experiment.ended_at),
        "rollout": experiment.rollout,
        "recorded_decision": experiment.decision,
    }


def _transitions(db: Database, experiment_id: str) -> list[dict[str, Any]]:
    """Every recorded transition, with the users seen by then (to place it on the users axis of the charts)."""
    rows = []
    with db.session() as session:
        for event in list_events(db, experiment_id):
            users = session.scalar(
                select(func.count(func.distinct(SearchEvent.user_id)))
                .where(SearchEvent.experiment_id == experiment_id, SearchEvent.user_id.is_not(None),
                       SearchEvent.arm.in_(ARMS), SearchEvent.ts <= event.ts)
            )
            rows.append({"ts": _iso(event.ts), "kind": event.kind, "from_share": event.from_share,
                         "to_share": event.to_share, "reason": event.reason, "users": int(users or 0)})
    return rows


def _simulated(db: Database, experiment_id: str) -> dict[str, Any]:
    simulated = SearchEvent.user_id.like(f"{SIMULATED_PREFIX}%")
    mine = SearchEvent.experiment_id == experiment_id
    with db.session() as session:
        events = session.scalar(select(func.count()).select_from(SearchEvent).where(mine)) or 0
        sim_events = session.scalar(select(func.count()).select_from(SearchEvent).where(mine, simulated)) or 0
        sim_users = session.scalar(select(func.count(func.distinct(SearchEvent.user_id))).where(mine, simulated)) or 0
        feedback = session.scalar(select(func.count()).select_from(Feedback)
                                  .join(SearchEvent, SearchEvent.id == Feedback.event_id).where(mine)) or 0
        sim_feedback = session.scalar(select(func.count()).select_from(Feedback)
                                      .join(SearchEvent, SearchEvent.id == Feedback.event_id)
                                      .where(mine, simulated)) or 0
    return {"events": events, "simulated_events": sim_events, "simulated_users": sim_users, "feedback": feedback,
            "simulated_feedback": sim_feedback, "any": sim_events > 0, "all": events > 0 and sim_events == events}


def _examples(db: Database, experiment_id: str) -> dict[str, Any]:
    """Up to `EXAMPLES` queries answered by both arms, newest first; else the latest answer of each arm."""
    answered = (SearchEvent.experiment_id == experiment_id, SearchEvent.status != "error",
                SearchEvent.answer.is_not(None), SearchEvent.answer != "", SearchEvent.served_arm.in_(ARMS))
    with db.session() as session:
        queries = session.scalars(
            select(SearchEvent.query).where(*answered).group_by(SearchEvent.query)
            .having(func.count(func.distinct(SearchEvent.served_arm)) == len(ARMS))
            .order_by(func.max(SearchEvent.ts).desc()).limit(EXAMPLES)
        ).all()
        mode = "pairs" if queries else "latest"
        rows = []
        for query in queries or [None]:
            row: dict[str, Any] = {"query": query, "arms": {}}
            for arm in ARMS:
                chosen = select(SearchEvent).where(*answered, SearchEvent.served_arm == arm)
                if query is not None:
                    chosen = chosen.where(SearchEvent.query == query)
                event = session.scalars(chosen.order_by(SearchEvent.ts.desc(), SearchEvent.id).limit(1)).first()
                row["arms"][arm] = None if event is None else _answer(session, event)
            if any(row["arms"].values()):
                rows.append(row)
    return {"mode": mode, "rows": rows}


def _answer(session: Any, event: SearchEvent) -> dict[str, Any]:
    feedback = session.scalars(select(Feedback).where(Feedback.event_id == event.id).order_by(Feedback.ts)).all()
    return {
        "event_id": event.id, "ts": _iso(event.ts), "query": event.query, "model": event.model,
        "assigned_arm": event.arm, "status": event.status, "answer": _truncate(event.answer or ""),
        "simulated": (event.user_id or "").startswith(SIMULATED_PREFIX),
        "feedback": [{"thumbs": f.thumbs, "rating": f.rating,
                      "corrected_answer": _truncate(f.corrected_answer) if f.corrected_answer else None,
                      "comment": _truncate(f.comment) if f.comment else None} for f in feedback],
    }


def _offline_gate(db: Database, adapter_id: str | None) -> dict[str, Any] | None:
    if not adapter_id:
        return None
    with db.session() as session:
        adapter = session.get(Adapter, adapter_id)
        if adapter is None:
            return {"adapter_id": adapter_id, "missing": True}
        return {"adapter_id": adapter.id, "name": adapter.name, "base_model": adapter.base_model,
                "dataset_hash": adapter.dataset_hash, "created_at": _iso(adapter.created_at),
                "train_metrics": adapter.train_metrics, "eval_metrics": adapter.eval_metrics}


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _truncate(text: str, limit: int = ANSWER_CHARS) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + "…"


# ------------------------------------------------------------------------------------------------ formatting


def _e(value: Any) -> str:
    """Every piece of text in the page goes through here: queries, answers and names come from users and models."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _value(metric: str, value: Any) -> str:
    """A metric's value in its natural unit: rates as percentages, latency in ms."""
    v = _num(value)
    if v is None:
        return "–"
    if metric == "int":
        return f"{v:,.0f}"
    if metric in _PERCENT:
        return f"{v * 100:.1f}%"
    if metric == "latency_p95_ms":
        return f"{v:,.0f} ms"
    if metric == "mean_rating":
        return f"{v:.2f}"
    if metric == "tokens_out_per_request":
        return f"{v:.1f}"
    return f"{v:.3f}"


def _delta(metric: str, value: Any, sign: bool = True) -> str:
    """A difference of two values: percentage points for rates."""
    v = _num(value)
    if v is None:
        return "–"
    plus = "+" if sign else ""
    if metric in _PERCENT:
        return _signed(v * 100, f"{plus}.1f") + " pp"
    if metric == "latency_p95_ms":
        return _signed(v, f"{plus},.0f") + " ms"
    if metric == "mean_rating" or metric == "tokens_out_per_request":
        return _signed(v, f"{plus}.2f")
    return _signed(v, f"{plus}.3f")


def _signed(value: float, spec: str) -> str:
    """Format, but never as "-0.0": a difference that rounds to nothing has no direction."""
    text = format(value, spec)
    return format(0.0, spec) if text.lstrip("+-").strip("0.,") == "" else text


def _interval(metric: str, ci: Sequence[Any] | None, delta: bool = True) -> str:
    if not ci or _num(ci[0]) is None or _num(ci[1]) is None:
        return "–"
    show = _delta if delta else _value
    return f"[{show(metric, ci[0])}, {show(metric, ci[1])}]"


def _p(value: Any) -> str:
    v = _num(value)
    if v is None:
        return "–"
    return "< 0.001" if v < 0.001 else f"{v:.3f}"


def _pct(value: Any, digits: int = 0) -> str:
    v = _num(value)
    return "–" if v is None else f"{v * 100:.{digits}f}%"


def _when(iso: str | None, seconds: bool = True) -> str:
    if not iso:
        return "–"
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC")


def _label(metric: str) -> str:
    return METRICS[metric].label if metric in METRICS else metric.replace("_", " ")


def _arm_name(bundle: dict[str, Any], arm: str) -> str:
    if not bundle.get("experiment"):
        return "–"
    described = bundle["experiment"].get(arm) or {}
    return described.get("model") or ("no candidate" if arm == "candidate" else "(model not named)")


def _verdict(bundle: dict[str, Any]) -> tuple[str, str, str, str]:
    """(action, headline, css class, reason) of the analysis' decision."""
    decision = (bundle.get("analysis") or {}).get("decision") or {}
    action = decision.get("action") or NOT_ENOUGH_DATA
    headline, tone = _VERDICTS.get(action, (action.replace("_", " ").capitalize(), "muted"))
    return action, headline, tone, decision.get("reason") or ""


def _simulated_text(simulated: dict[str, Any] | None) -> str | None:
    if not simulated or not simulated.get("any"):
        return None
    counts = (f"{simulated['simulated_events']:,} of {simulated['events']:,} requests from "
              f"{simulated['simulated_users']:,} simulated users; {simulated['simulated_feedback']:,} of "
              f"{simulated['feedback']:,} feedback rows on them")
    if simulated.get("all"):
        return f"{SIMULATED_BANNER}. {counts}."
    return (f"Part of the traffic and feedback in this experiment was SIMULATED (sim- users): {counts}. "
            "Read the comparison with that in mind.")


# ------------------------------------------------------------------------------------------------------ SVG


@dataclass
class _Series:
    name: str
    color: str
    points: list[tuple[float, float | None]]
    band: list[tuple[float, float, float] | None] = field(default_factory=list)
    tips: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Frame:
    """Maps data to pixels inside the plot area of a `width` x `height` viewBox."""

    width: float
    height: float
    x0: float
    x1: float
    y0: float
    y1: float
    left: float = 64.0
    right: float = 20.0
    top: float = 26.0
    bottom: float = 36.0

    def x(self, value: float) -> float:
        span = self.x1 - self.x0 or 1.0
        return self.left + (value - self.x0) / span * (self.width - self.left - self.right)

    def y(self, value: float) -> float:
        span = self.y1 - self.y0 or 1.0
        return self.height - self.bottom - (value - self.y0) / span * (self.height - self.top - self.bottom)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (the usual 1-2-5 steps)."""
    span = high - low
    if span <= 0 or not math.isfinite(span):
        return [low]
    raw = span / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step + 1e-9) * step
    ticks = []
    value = start
    while value <= high + step * 1e-6 + step and len(ticks) < 20:
        ticks.append(round(value, 12))
        if value >= high - step * 1e-6:
            break
        value += step
    return ticks


def _domain(core: list[float], full: list[float], bounds: tuple[float, float], zero: bool) -> tuple[float, float]:
    """The y range: the values and final intervals, widened by early intervals only within reason.

    The first looks have very wide intervals; drawn in full they would flatten everything after.
    Points outside the range are clipped to the plot area.
    """
    if zero:
        core = [*core, 0.0]
    low, high = min(core), max(core)
    span = max(high - low, abs(high) * 0.05, 1e-6)
    low = max(min(full, default=low), low - 1.5 * span)
    high = min(max(full, default=high), high + 1.5 * span)
    low, high = max(low, bounds[0]), min(high, bounds[1])
    if high <= low:
        low, high = low - 0.5, high + 0.5
    pad = (high - low) * 0.06
    return low - pad, high + pad


def _fmt_axis(value: float, metric: str, delta: bool) -> str:
    if metric in _PERCENT:
        text = f"{value * 100:.{0 if abs(value) >= 0.1 or value == 0 else 1}f}"
        return f"{'+' if delta and value > 0 else ''}{text}{' pp' if delta else '%'}"
    text = f"{value:.3g}"
    return f"+{text}" if delta and value > 0 else text


def _line_chart(series: Sequence[_Series], *, metric: str, delta: bool, height: int, markers: Sequence[dict[str, Any]],
                label: str, chart_id: str) -> str:
    width = 1000
    xs = [x for s in series for x, y in s.points if y is not None]  # the axis starts at the first look with a value
    core = [y for s in series for _, y in s.points if y is not None]
    full = [v for s in series for b in s.band if b for v in b[1:]]
    for s in series:  # the latest interval of each series always fits
        last = next((b for b in reversed(s.band) if b), None)
        if last:
            core.extend(last[1:])
    if not xs or not core:
        return ""
    x0, x1 = min(xs), max(xs)
    if x1 <= x0:
        x0, x1 = x0 - 1, x1 + 1
    low, high = _BOUNDS.get(metric, (0.0, 1.0))
    bounds = (low - high, high - low) if delta else (low, high)  # a difference of values in [a, b] is within ±(b - a)
    y0, y1 = _domain(core, full, bounds, zero=delta)
    frame = _Frame(width, height, x0, x1, y0, y1)
    plot_w, plot_h = width - frame.left - frame.right, height - frame.top - frame.bottom
    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="{_e(label)}" '
           f'preserveAspectRatio="xMidYMid meet">',
           f'<defs><clipPath id="{chart_id}-clip"><rect x="{frame.left}" y="{frame.top}" width="{plot_w}" '
           f'height="{plot_h}"/></clipPath></defs>',
           f'<rect x="{frame.left}" y="{frame.top}" width="{plot_w}" height="{plot_h}" class="plot"/>']
    for tick in _ticks(y0, y1):
        if y0 <= tick <= y1:
            y = frame.y(tick)
            out.append(f'<line x1="{frame.left}" x2="{width - frame.right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
            out.append(f'<text x="{frame.left - 8}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
                       f'{_e(_fmt_axis(tick, metric, delta))}</text>')
    for tick in _ticks(x0, x1, 8):
        if x0 <= tick <= x1 and float(tick).is_integer():
            x = frame.x(tick)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{height - frame.bottom}" '
                       f'y2="{height - frame.bottom + 4}" class="axis"/>')
            out.append(f'<text x="{x:.1f}" y="{height - frame.bottom + 18}" class="tick" text-anchor="middle">'
                       f'{tick:,.0f}</text>')
    out.append(f'<text x="{width - frame.right}" y="{height - 4}" class="axis-label" text-anchor="end">'
               'users in the comparison (both arms)</text>')
    out.append(f'<g clip-path="url(#{chart_id}-clip)">')
    if delta and y0 < 0 < y1:
        out.append(f'<line x1="{frame.left}" x2="{width - frame.right}" y1="{frame.y(0):.1f}" y2="{frame.y(0):.1f}" '
                   'class="zero"/>')
    for s in series:
        for run in _runs(s.band):
            upper = " ".join(f"{frame.x(x):.1f},{frame.y(hi):.1f}" for x, _lo, hi in run)
            lower = " ".join(f"{frame.x(x):.1f},{frame.y(lo):.1f}" for x, lo, _hi in reversed(run))
            out.append(f'<polygon points="{upper} {lower}" fill="{s.color}" fill-opacity="0.14" stroke="{s.color}" '
                       'stroke-opacity="0.35" stroke-width="1"/>')
    for s in series:
        for run in _runs([(x, y) if y is not None else None for x, y in s.points]):
            path = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in run)
            out.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="2.5" '
                       'stroke-linejoin="round"/>')
        for n, (x, y) in enumerate(s.points):
            if y is not None:
                tip = s.tips[n] if n < len(s.tips) else ""
                out.append(f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="3.5" fill="#fff" '
                           f'stroke="{s.color}" stroke-width="2"><title>{_e(tip)}</title></circle>')
    out.append("</g>")
    for marker in markers:
        users = _num(marker.get("users"))
        if users is None or not x0 <= users <= x1:
            continue
        x = frame.x(users)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{frame.top}" y2="{height - frame.bottom}" class="marker">'
                   f'<title>{_e(marker.get("title"))}</title></line>')
        out.append(f'<text x="{x + 4:.1f}" y="{frame.top - 8}" class="marker-label">{_e(marker.get("label"))}</text>')
    out.append("</svg>")
    return "".join(out)


def _runs(items: Iterable[Any]) -> list[list[Any]]:
    """Contiguous stretches of non-None items (a line or band breaks where a look had no value)."""
    runs: list[list[Any]] = [[]]
    for item in items:
        if item is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(item)
    return [run for run in runs if run]


def _interval_bar(metric: str, comparison: dict[str, Any]) -> str:
    """A small bar of the difference's interval around zero, green/red where it clears zero (GrowthBook's style)."""
    ci = comparison.get("ci") or [None, None]
    low, high, point = _num(ci[0]), _num(ci[1]), _num(comparison.get("difference"))
    if low is None or high is None or point is None:
        return ""
    reach = max(abs(low), abs(high), 1e-12) * 1.15
    width, height = 150, 22

    def x(value: float) -> float:
        return width / 2 + value / reach * (width / 2 - 4)

    better_up = comparison.get("higher_is_better", True)
    if low > 0 or high < 0:
        good = (low > 0) == better_up
        color = "#059669" if good else "#dc2626"
    else:
        color = "#94a3b8"
    return (f'<svg class="ci-bar" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="interval {_e(_interval(metric, ci))}">'
            f'<line x1="{width / 2}" x2="{width / 2}" y1="1" y2="{height - 1}" stroke="#475569" stroke-width="1"/>'
            f'<rect x="{x(low):.1f}" y="6" width="{max(x(high) - x(low), 1.5):.1f}" height="10" rx="3" '
            f'fill="{color}" fill-opacity="0.75"/>'
            f'<circle cx="{x(point):.1f}" cy="11" r="3.2" fill="#fff" stroke="{color}" stroke-width="2"/></svg>')


# ----------------------------------------------------------------------------------------------------- HTML

_CSS = """
:root{--bg:#f4f5f9;--card:#fff;--ink:#111827;--ink2:#374151;--muted:#6b7280;--line:#e5e7eb;--soft:#f9fafb;
--control:#64748b;--candidate:#7c3aed;--good:#047857;--good-bg:#ecfdf5;--bad:#b91c1c;--bad-bg:#fef2f2;
--warn:#b45309;--warn-bg:#fffbeb;--muted-bg:#f3f4f6}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.55 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue","Liberation Sans",Arial,sans-serif}
.wrap{max-width:1180px;margin:0 auto;padding:0 28px}
.topbar{background:#111827;color:#e5e7eb;font-size:13px;padding:9px 0;letter-spacing:.02em}
.topbar b{color:#fff}
.topbar .right{float:right;color:#9ca3af}
header.exp{background:var(--card);border-bottom:1px solid var(--line);padding:22px 0 18px}
header.exp h1{font-size:24px;margin:0 0 4px;font-weight:700}
header.exp .id{font:12px/1.4 "DejaVu Sans Mono","Liberation Mono",Menlo,monospace;color:var(--muted)}
.meta{display:flex;flex-wrap:wrap;gap:6px 22px;margin-top:10px;color:var(--ink2);font-size:13px}
.meta span b{color:var(--muted);font-weight:600;margin-right:4px}
.arms{display:grid;grid-template-columns:1fr 1fr;gap:14px;margin-top:16px}
.arm{border:1px solid var(--line);border-radius:10px;padding:10px 14px;background:var(--soft)}
.arm .name{font-weight:700;font-size:15px;word-break:break-all}
.arm .sub{color:var(--muted);font-size:12px;word-break:break-all}
.tag{display:inline-block;font-size:11px;font-weight:700;text-transform:uppercase;letter-spacing:.06em;
padding:1px 8px;border-radius:999px;margin-right:8px;vertical-align:1px}
.tag.control{background:#e2e8f0;color:#334155}.tag.candidate{background:#ede9fe;color:#5b21b6}
.pill{display:inline-block;padding:2px 10px;border-radius:999px;font-size:12px;font-weight:700;
text-transform:uppercase;letter-spacing:.05em;vertical-align:middle;white-space:nowrap}
.pill.good{background:var(--good-bg);color:var(--good)}.pill.bad{background:var(--bad-bg);color:var(--bad)}
.pill.warn{background:var(--warn-bg);color:var(--warn)}.pill.muted{background:var(--muted-bg);color:var(--muted)}
.pill.info{background:#eff6ff;color:#1d4ed8}
main{padding:6px 0 30px}
.banner{margin:18px 0 0;padding:12px 16px;border-radius:10px;background:#fff7ed;border:1px solid #fb923c;
color:#7c2d12;font-weight:600}
.banner small{display:block;font-weight:400;color:#9a3412;margin-top:2px}
.note{margin:14px 0 0;padding:9px 14px;border-radius:8px;background:#eff6ff;color:#1e3a8a;font-size:13px}
section.card{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:20px 24px;margin:18px 0;
box-shadow:0 1px 2px rgba(16,24,40,.04)}
section.card>h2{font-size:16px;margin:0 0 4px;font-weight:700}
section.card>.lead{color:var(--muted);font-size:13px;margin:0 0 14px}
.verdict{border-left:8px solid var(--tone)!important}
.verdict.good{--tone:#059669}.verdict.bad{--tone:#dc2626}.verdict.warn{--tone:#d97706}.verdict.muted{--tone:#9ca3af}
.verdict .action{font-size:32px;font-weight:800;color:var(--tone);margin:2px 0 6px;line-height:1.2}
.verdict .action code{font-size:14px;font-weight:600;color:var(--muted);margin-left:10px;
background:var(--muted-bg);padding:2px 8px;border-radius:6px}
.verdict .reason{font-size:15px;color:var(--ink2);max-width:980px}
.figures{display:grid;grid-template-columns:repeat(4,1fr);gap:12px;margin-top:18px}
.figure{background:var(--soft);border:1px solid var(--line);border-radius:10px;padding:10px 14px}
.figure .k{font-size:12px;color:var(--muted);font-weight:600}
.figure .v{font-size:20px;font-weight:700;font-variant-numeric:tabular-nums}
.figure .s{font-size:12px;color:var(--muted);font-variant-numeric:tabular-nums}
.recorded{margin-top:14px;font-size:13px;color:var(--ink2)}
table{width:100%;border-collapse:collapse;font-size:13px}
th{text-align:left;color:var(--muted);font-weight:600;font-size:11px;text-transform:uppercase;letter-spacing:.04em;
border-bottom:1px solid var(--line);padding:7px 8px;vertical-align:bottom;line-height:1.3}
td{padding:8px 8px;border-bottom:1px solid #f0f1f4;vertical-align:middle}
tr:last-child td{border-bottom:none}
table.compact{width:auto;min-width:620px}
table.compact td:first-child{padding-right:48px}
th .nm{text-transform:none;letter-spacing:0;color:var(--ink2)}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.num,td.nowrap{white-space:nowrap}
tr.primary td{background:#faf5ff}
td .sub{display:block;color:var(--muted);font-size:12px}
.reason-cell{color:var(--ink2);max-width:520px}
.legend{display:flex;gap:18px;font-size:13px;color:var(--ink2);margin:0 0 4px}
.legend i{display:inline-block;width:14px;height:4px;border-radius:2px;margin-right:6px;vertical-align:3px}
.legend i.band{height:10px;vertical-align:0;opacity:.35}
.legend i.mark{width:0;height:12px;border-left:2px dashed #0f766e;vertical-align:-1px;border-radius:0}
svg.chart{display:block;margin:2px 0 8px}
svg.chart .plot{fill:#fcfcfd;stroke:#e5e7eb}
svg.chart .grid{stroke:#eceef2;stroke-width:1}
svg.chart .axis{stroke:#9ca3af}
svg.chart .tick{fill:#6b7280;font-size:12px}
svg.chart .axis-label{fill:#6b7280;font-size:12px;font-style:italic}
svg.chart .zero{stroke:#111827;stroke-width:1.5;stroke-dasharray:6 4}
svg.chart .marker{stroke:#0f766e;stroke-width:1.5;stroke-dasharray:4 4}
svg.chart .marker-label{fill:#0f766e;font-size:12px;font-weight:700}
h3{font-size:13px;margin:18px 0 4px;color:var(--ink2)}
.empty{padding:18px;border:1px dashed var(--line);border-radius:10px;color:var(--muted);text-align:center;
background:var(--soft)}
.pair{border:1px solid var(--line);border-radius:10px;margin:12px 0;overflow:hidden}
.pair .q{background:var(--soft);padding:9px 14px;border-bottom:1px solid var(--line);font-weight:600}
.pair .q span{color:var(--muted);font-weight:600;margin-right:6px}
.pair .cols{display:grid;grid-template-columns:1fr 1fr}
.pair .col{padding:10px 14px}
.pair .col+.col{border-left:1px solid var(--line)}
.answer{white-space:pre-wrap;word-break:break-word;font-size:13px;color:var(--ink2);margin:6px 0}
.fb{font-size:12px;color:var(--muted);border-top:1px dashed var(--line);padding-top:6px;margin-top:6px}
.fb .sim{color:#9a3412;font-weight:700}
.kv{display:grid;grid-template-columns:repeat(3,1fr);gap:10px}
ul.notes{margin:6px 0 0;padding-left:18px;color:var(--ink2);font-size:13px}
ul.notes li{margin:3px 0}
footer{color:var(--muted);font-size:12px;padding:0 0 40px}
code{font-family:"DejaVu Sans Mono","Liberation Mono",Menlo,monospace;font-size:12px}
@media print{body{background:#fff}section.card{break-inside:avoid;box-shadow:none}}
"""


def render_html(bundle: dict[str, Any]) -> str:
    """The report as one HTML document: inline CSS and SVG, no script, nothing fetched."""
    experiment = bundle.get("experiment") or {}
    title = f"Experiment {experiment['id'][:8]}" if experiment.get("id") else "Experiment report"
    sections = [_verdict_section(bundle), _chart_section(bundle), _metrics_section(bundle), _guardrail_section(bundle),
                _transition_section(bundle), _phase_section(bundle), _example_section(bundle),
                _offline_section(bundle)]
    return "".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>abloop · {_e(title)}</title><style>{_CSS}</style></head><body>",
        f'<div class="topbar"><div class="wrap"><b>abloop</b> · experiment report'
        f'<span class="right">generated {_e(_when(bundle.get("generated_at")))}</span></div></div>',
        _header(bundle, title),
        '<main><div class="wrap">', *sections, "</div></main>",
        _footer(bundle),
        "</body></html>",
    ])


def _header(bundle: dict[str, Any], title: str) -> str:
    experiment = bundle.get("experiment") or {}
    _action, headline, tone, _reason = _verdict(bundle)
    status = experiment.get("status")
    status_tone = {"running": "info", "promoted": "good", "rolled_back": "bad"}.get(status or "", "muted")
    parts = ['<header class="exp"><div class="wrap">',
             f'<h1>{_e(title)} <span class="pill {status_tone}">{_e(status or "no experiment")}</span> '
             f'<span class="pill {tone}">{_e(headline)}</span></h1>']
    if experiment.get("id"):
        parts.append(f'<div class="id">{_e(experiment["id"])}</div>')
    analysis = bundle.get("analysis") or {}
    share = experiment.get("candidate_share")
    meta = [("report on", bundle.get("selection")),
            ("started", _when(experiment.get("started_at"), False) if experiment.get("started_at") else None),
            ("ended", _when(experiment.get("ended_at"), False) if experiment.get("ended_at") else None),
            ("candidate share", _pct(share) if share is not None else None),
            ("primary metric", analysis.get("primary_metric"))]
    parts.append('<div class="meta">' + "".join(f"<span><b>{_e(k)}</b>{_e(v)}</span>" for k, v in meta if v)
                 + "</div>")
    if experiment:
        parts.append('<div class="arms">')
        for arm in ARMS:
            described = experiment.get(arm)
            users = (analysis.get("arms") or {}).get(arm, {}).get("users")
            if described:
                adapter = f" · adapter {described['adapter_id']}" if described.get("adapter_id") else ""
                sub = f"{described.get('base_url')}{adapter} · {users or 0:,} users"
                name = described.get("model") or "(model not named)"
            else:
                name, sub = "no candidate arm", "every user is served by control"
            parts.append(f'<div class="arm"><span class="tag {arm}">{arm}</span><span class="name">{_e(name)}</span>'
                         f'<div class="sub">{_e(sub)}</div></div>')
        parts.append("</div>")
    banner = _simulated_text(bundle.get("simulated"))
    if banner:
        parts.append(f'<div class="banner" role="alert">{_e(banner)}<small>Use this report to check the machinery, '
                     "not to judge the models.</small></div>")
    if experiment and status != RUNNING:
        ended = f" on {_when(experiment.get('ended_at'))}" if experiment.get("ended_at") else ""
        parts.append(f'<div class="note">This experiment ended as <b>{_e(status)}</b>{_e(ended)}. Reporting '
                     f'{_e(bundle.get("selection"))}.</div>')
    parts.append("</div></header>")
    return "".join(parts)


def _card(title: str, lead: str, body: str, extra_class: str = "", anchor: str = "") -> str:
    anchor_attr = f' id="{_e(anchor)}"' if anchor else ""
    lead_html = f'<p class="lead">{lead}</p>' if lead else ""
    return f'<section class="card {extra_class}"{anchor_attr}><h2>{_e(title)}</h2>{lead_html}{body}</section>'


def _verdict_section(bundle: dict[str, Any]) -> str:
    action, headline, tone, reason = _verdict(bundle)
    analysis = bundle.get("analysis") or {}
    primary = analysis.get("primary") or {}
    metric = analysis.get("primary_metric") or "satisfaction"
    body = [f'<div class="action">{_e(headline)}<code>{_e(action)}</code></div>',
            f'<div class="reason">{_e(reason)}</div>']
    arms = primary.get("arms") or {}
    figures = []
    for arm in ARMS:
        value = arms.get(arm) or {}
        figures.append((f"{arm} · {_arm_name(bundle, arm)}", _value(metric, value.get("value")),
                        f"always-valid {_interval(metric, value.get('ci'), delta=False)} · "
                        f"{(analysis.get('arms') or {}).get(arm, {}).get('users', 0):,} users"))
    figures.append(("difference (candidate − control)", _delta(metric, primary.get("difference")),
                    f"always-valid 95% {_interval(metric, primary.get('ci'))}"))
    figures.append(("chance candidate is better", _pct(primary.get("chance_to_win"), 1),
                    f"relative {_pct(primary.get('relative'), 1) if primary.get('relative') is not None else '–'}"))
    body.append('<div class="figures">' + "".join(
        f'<div class="figure"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div><div class="s">{_e(s)}</div>'
        "</div>" for k, v, s in figures) + "</div>")
    recorded = (bundle.get("experiment") or {}).get("recorded_decision") or {}
    if recorded:
        said = recorded.get("action") or (bundle.get("experiment") or {}).get("status")
        rollout = recorded.get("rollout")
        extra = f" · rollout: {rollout.get('did')}" if isinstance(rollout, dict) and rollout.get("did") else ""
        when = f" (evaluated {_when(recorded['evaluated_at'])})" if recorded.get("evaluated_at") else ""
        body.append(f'<div class="recorded"><b>Last decision recorded on the experiment{_e(when)}:</b> {_e(said)} — '
                    f"{_e(recorded.get('reason'))}{_e(extra)}</div>")
    body.append(f'<p class="lead" style="margin:12px 0 0">Primary metric: <b>{_e(_label(metric))}</b>. The decision '
                "reads only the always-valid interval of the difference; guardrails and the sample-ratio check come "
                "first.</p>")
    return _card("Verdict", "", "".join(body), f"verdict {tone}", "verdict")


def _chart_section(bundle: dict[str, Any]) -> str:
    analysis = bundle.get("analysis") or {}
    metric = analysis.get("primary_metric") or "satisfaction"
    points = bundle.get("timeline") or []
    markers = _markers(bundle.get("transitions") or [])
    arms, difference = [], None
    if points:
        colors = {"control": "#64748b", "candidate": "#7c3aed"}
        for arm in ARMS:
            arms.append(_arm_series(points, arm, colors[arm], metric, _arm_name(bundle, arm)))
        difference = _difference_series(points, metric)
    value_chart = _line_chart(arms, metric=metric, delta=False, height=320, markers=markers,
                              label=f"{metric} per arm over time", chart_id="value") if points else ""
    diff_chart = _line_chart([difference], metric=metric, delta=True, height=230, markers=markers,
                             label=f"{metric} difference over time", chart_id="diff") if difference else ""
    if not value_chart and not diff_chart:
        body = '<div class="empty">Not enough data for a chart yet: no look had a value for both arms.</div>'
    else:
        marker_legend = '<span><i class="mark"></i>rollout / share change</span>' if markers else ""
        first, last = points[0].get("ts"), points[-1].get("ts")
        control, candidate = _e(_arm_name(bundle, "control")), _e(_arm_name(bundle, "candidate"))
        body = (f'<div class="legend"><span><i style="background:#64748b"></i>control · {control}</span>'
                f'<span><i style="background:#7c3aed"></i>candidate · {candidate}</span>'
                '<span><i class="band" style="background:#7c3aed"></i>always-valid 95% band</span>'
                f"{marker_legend}</div>{value_chart}"
                "<h3>Difference (candidate − control) with its confidence sequence</h3>"
                '<div class="legend"><span><i style="background:#7c3aed"></i>difference</span>'
                f'<span><i style="background:#111827"></i>zero: no difference</span></div>{diff_chart}'
                f'<p class="lead">{len(points)} looks from {_e(_when(first))} to {_e(_when(last))}; each '
                "re-analyses the experiment as it stood then, so the band is what an operator would have seen. "
                "Hover a point for its time. Bands wider than the plot are clipped to the metric's possible range. "
                "The decision is promote once the band lies above zero, roll back once it lies below.</p>")
    lead = f"{_e(_label(metric))}, per arm and as a difference, over the course of the experiment."
    return _card("Primary metric over time", lead, body, anchor="timeline")


def _markers(transitions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    markers = []
    for t in transitions:
        kind = t.get("kind")
        if kind in SHARE_KINDS:
            label = f"→ {_pct(t.get('to_share'))}"
        elif kind in END_KINDS:
            label = str(kind).replace("_", " ")
        else:
            continue
        markers.append({"users": t.get("users"), "label": label,
                        "title": f"{_when(t.get('ts'))} · {kind}: {t.get('reason') or ''}"})
    return markers


def _arm_series(points: Sequence[dict[str, Any]], arm: str, color: str, metric: str, name: str) -> _Series:
    series = _Series(name=arm, color=color, points=[], band=[])
    for point in points:
        x = float(sum(point.get("users") or [0, 0]))
        value = ((point.get("arms") or {}).get(arm)) or {}
        y, ci = _num(value.get("value")), value.get("ci")
        series.points.append((x, y))
        ok = ci and _num(ci[0]) is not None and _num(ci[1]) is not None
        series.band.append((x, float(ci[0]), float(ci[1])) if ok else None)
        series.tips.append(f"{_when(point.get('ts'))} · {int(x):,} users · {arm} ({name}) {_value(metric, y)} "
                           f"{_interval(metric, ci, delta=False) if ok else ''}")
    return series


def _difference_series(points: Sequence[dict[str, Any]], metric: str) -> _Series | None:
    series = _Series(name="difference", color="#7c3aed", points=[], band=[])
    for point in points:
        x = float(sum(point.get("users") or [0, 0]))
        y, ci = _num(point.get("difference")), point.get("ci")
        series.points.append((x, y))
        ok = ci and _num(ci[0]) is not None and _num(ci[1]) is not None
        series.band.append((x, float(ci[0]), float(ci[1])) if ok else None)
        series.tips.append(f"{_when(point.get('ts'))} · {int(x):,} users · difference {_delta(metric, y)} "
                           f"{_interval(metric, ci) if ok else ''} · {point.get('action') or ''}")
    return series if any(y is not None for _, y in series.points) else None


def _metrics_section(bundle: dict[str, Any]) -> str:
    analysis = bundle.get("analysis") or {}
    metrics = analysis.get("metrics") or {}
    primary_name = analysis.get("primary_metric")
    rows = []
    order = [primary_name, *[m for m in metrics if m != primary_name]] if primary_name in metrics else list(metrics)
    for name in order:
        comparison = metrics.get(name)
        if not comparison:
            rows.append(f'<tr><td>{_e(name)}<span class="sub">{_e(_label(name))}</span></td>'
                        '<td class="num" colspan="8">no data in one arm</td></tr>')
            continue
        cuped = comparison.get("cuped") or {}
        reduction = _num(cuped.get("variance_reduction")) if isinstance(cuped, dict) else None
        fixed = comparison.get("fixed_horizon") or {}
        direction = "higher is better" if comparison.get("higher_is_better", True) else "lower is better"
        star = " ★ primary" if name == primary_name else ""
        rows.append(
            f'<tr class="{"primary" if name == primary_name else ""}">'
            f'<td><b>{_e(name)}</b>{_e(star)}<span class="sub">{_e(_label(name))} · {direction}</span></td>'
            f'<td class="num">{_e(_value(name, comparison.get("control")))}</td>'
            f'<td class="num">{_e(_value(name, comparison.get("candidate")))}</td>'
            f'<td class="num"><b>{_e(_delta(name, comparison.get("difference")))}</b></td>'
            f'<td class="num">{_e(_interval(name, comparison.get("ci")))}</td>'
            f"<td>{_interval_bar(name, comparison)}</td>"
            f'<td class="num">{_e(_pct(comparison.get("chance_to_win"), 1))}</td>'
            f'<td class="num">{_e(_p(fixed.get("p_value")))}</td>'
            f'<td class="num">{_e(_pct(reduction, 0) if reduction is not None else "–")}</td></tr>')
    if rows:
        comparison_table = (
            "<table><thead><tr><th>metric</th><th class=num>control</th><th class=num>candidate</th>"
            "<th class=num>difference</th><th class=num>always-valid 95% interval</th><th>interval vs 0</th>"
            "<th class=num>chance to win</th><th class=num>fixed-horizon p (reference only)</th>"
            f"<th class=num>CUPED variance cut</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    else:
        comparison_table = '<div class="empty">No comparison yet: the experiment needs users in both arms.</div>'
    arms = analysis.get("arms") or {}
    arm_rows = "".join(
        f"<tr><td>{_e(label)}</td>"
        + "".join(f'<td class="num">{_e(_value(kind, (arms.get(arm) or {}).get(key)))}</td>' for arm in ARMS)
        + "</tr>"
        for key, label, kind in _ARM_ROWS if any((arms.get(arm) or {}).get(key) is not None for arm in ARMS))
    arm_table = (f'<h3>Per-arm figures (by assigned arm)</h3><table class="compact"><thead><tr><th>figure</th>'
                 f'<th class=num>control<br><span class="nm">{_e(_arm_name(bundle, "control"))}</span></th>'
                 f'<th class=num>candidate<br><span class="nm">{_e(_arm_name(bundle, "candidate"))}</span></th>'
                 "</tr></thead>"
                 f"<tbody>{arm_rows}</tbody></table>")
    assignment = analysis.get("assignment") or {}
    notes = ""
    if assignment:
        notes = (f'<p class="lead" style="margin-top:10px">Assignment: {_e(assignment.get("rule"))}; '
                 f'{assignment.get("users_in_both_arms", 0):,} users seen in both arms '
                 f'({assignment.get("requests_excluded", 0):,} later requests left out); '
                 f'{assignment.get("anonymous_requests", 0):,} anonymous requests (never randomised) left out.</p>')
    lead = ("Candidate − control per metric, with the always-valid 95% interval that decisions use. Rates are in "
            "percent, differences in percentage points (pp). Green: the interval clears zero in the candidate's "
            "favour; red: against it.")
    return _card("Metrics per arm", lead, comparison_table + arm_table + notes, anchor="metrics")


def _guardrail_section(bundle: dict[str, Any]) -> str:
    analysis = bundle.get("analysis") or {}
    guardrails = analysis.get("guardrails") or {}
    results = guardrails.get("results") or {}
    configured = {g.get("metric"): g for g in ((analysis.get("policy") or {}).get("guardrails") or [])}
    rows = []
    for name, result in results.items():
        status = result.get("status", "no data")
        tone = {"ok": "good", "breached": "bad", "waiting for sample": "warn"}.get(status, "muted")
        config = configured.get(name) or {}
        allowed = _delta(name, result.get("margin"), sign=False)
        if config.get("relative") and allowed != "–":
            allowed += f" ({_pct(config.get('margin'))} of control)"
        higher = (analysis.get("metrics") or {}).get(name, {}) or {}
        worse = "lower" if higher.get("higher_is_better", True) else "higher"
        rows.append(f"<tr><td><b>{_e(name)}</b><span class=sub>{_e(_label(name))}</span></td>"
                    f'<td><span class="pill {tone}">{_e(status)}</span></td>'
                    f'<td class="num">{_e(allowed)} {_e(worse if allowed != "–" else "")}</td>'
                    f'<td class="num">{_e(_delta(name, result.get("difference")))}</td>'
                    f'<td class="num">{_e(_interval(name, result.get("ci")))}</td></tr>')
    breached = guardrails.get("breached") or []
    body = ""
    if breached:
        body += '<div class="banner" style="margin:0 0 12px">' + "<br>".join(_e(b) for b in breached) + "</div>"
    if rows:
        body += ("<table><thead><tr><th>guardrail</th><th>status</th><th class=num>allowed to be worse by</th>"
                 "<th class=num>difference</th><th class=num>always-valid 95% interval</th></tr></thead>"
                 f"<tbody>{''.join(rows)}</tbody></table>")
    else:
        body += '<div class="empty">No guardrail checked yet.</div>'
    checked = "checked" if guardrails.get("checked") else "not checked yet: waiting for the minimum sample per arm"
    lead = (f"One-sided tests against a margin on the always-valid interval; breached only when the whole interval is "
            f"worse than the margin. Status: {_e(checked)}.")
    return _card("Guardrails", lead, body, anchor="guardrails")


def _share_move(t: dict[str, Any]) -> str:
    before, after = t.get("from_share"), t.get("to_share")
    if before is None and after is None:
        return "–"
    if before is None:
        return _pct(after)
    return f"{_pct(before)} → {_pct(after)}"


def _transition_section(bundle: dict[str, Any]) -> str:
    transitions = bundle.get("transitions") or []
    experiment = bundle.get("experiment") or {}
    rows = "".join(
        f'<tr><td class="nowrap">{_e(_when(t.get("ts")))}</td><td><span class="pill {_kind_tone(t.get("kind"))}">'
        f'{_e(t.get("kind"))}</span></td><td class="num">{_e(_share_move(t))}</td>'
        f'<td class="num">{t.get("users") or 0:,}</td><td class="reason-cell">{_e(t.get("reason"))}</td></tr>'
        for t in transitions)
    body = ("<table><thead><tr><th>time</th><th>kind</th><th class=num>share</th>"
            f"<th class=num>users by then</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table>"
            if rows else '<div class="empty">No transition recorded.</div>')
    rollout = experiment.get("rollout")
    if isinstance(rollout, dict) and rollout.get("steps"):
        steps = " → ".join(_pct(s) for s in rollout["steps"])
        step = rollout.get("step")
        approve = "yes" if rollout.get("auto_promote") else "no (an operator approves)"
        body = (f'<p class="lead">Rollout plan: {_e(steps)}; at step {_e((step or 0) + 1)}; at least '
                f'{_e(rollout.get("min_users_per_step"))} users and {_e(rollout.get("min_hours_per_step"))} h per '
                f"step; auto-promote {_e(approve)}.</p>") + body
    return _card("Rollout & transitions", "Every change of the split or state, oldest first, with its reason.", body,
                 anchor="transitions")


def _kind_tone(kind: Any) -> str:
    return {"promoted": "good", "rolled_back": "bad", "stopped": "muted", "start": "info"}.get(str(kind), "warn")


def _phase_section(bundle: dict[str, Any]) -> str:
    analysis = bundle.get("analysis") or {}
    phases = analysis.get("phases") or []
    rows = []
    for phase in phases:
        users = phase.get("users") or [0, 0]
        expected = phase.get("expected")
        expected_text = "–" if not expected else f"{expected[0]:,.1f} / {expected[1]:,.1f}"
        if phase.get("mismatch"):
            verdict = '<span class="pill bad">mismatch</span>'
        elif phase.get("p_value") is None:
            verdict = '<span class="pill muted">not testable</span>'
        else:
            verdict = '<span class="pill good">ok</span>'
        rows.append(f'<tr><td>phase {_e(phase.get("index", 0) + 1)}<span class="sub">{_e(phase.get("reason"))}</span>'
                    f'</td><td class="num">{_e(_pct(phase.get("share")))}</td>'
                    f'<td class="num">{_e(_when(phase.get("start")))}<span class="sub">to '
                    f'{_e(_when(phase.get("end")) if phase.get("end") else "now")}</span></td>'
                    f'<td class="num">{users[0]:,} / {users[1]:,}</td><td class="num">{_e(expected_text)}</td>'
                    f'<td class="num">{_e(_p(phase.get("p_value")))}</td><td>{verdict}</td></tr>')
    body = ("<table><thead><tr><th>phase</th><th class=num>candidate share</th><th class=num>from</th>"
            "<th class=num>users control / candidate</th><th class=num>expected</th><th class=num>p-value</th>"
            f"<th>split</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            if rows else '<div class="empty">No phase with users yet.</div>')
    threshold = (analysis.get("srm") or {}).get("threshold")
    lead = ("Chi-square per phase, against that phase's share, on the users active in it by the arm that served them"
            f"{f'; p < {threshold} flags a broken split and blocks any decision' if threshold else ''}.")
    return _card("Sample-ratio check per phase", _e(lead), body, anchor="phases")


def _example_section(bundle: dict[str, Any]) -> str:
    examples = bundle.get("examples") or {}
    rows = examples.get("rows") or []
    if not rows:
        return _card("Example answers side by side", "", '<div class="empty">No answered request logged yet.</div>',
                     anchor="examples")
    pairs = examples.get("mode") == "pairs"
    blocks = []
    for row in rows:
        query = row.get("query")
        head = (f'<div class="q"><span>query</span>{_e(query)}</div>' if pairs
                else '<div class="q"><span>latest answer of each arm</span></div>')
        cols = "".join(_answer_cell(bundle, arm, (row.get("arms") or {}).get(arm), show_query=not pairs)
                       for arm in ARMS)
        blocks.append(f'<div class="pair">{head}<div class="cols">{cols}</div></div>')
    lead = ("The newest queries that both arms answered (by the arm that served them), truncated to "
            f"{ANSWER_CHARS} characters, with the feedback they got."
            if pairs else "No query was answered by both arms yet; these are the latest answers of each arm.")
    return _card("Example answers side by side", _e(lead), "".join(blocks), anchor="examples")


def _answer_cell(bundle: dict[str, Any], arm: str, answer: dict[str, Any] | None, show_query: bool) -> str:
    header = f'<span class="tag {arm}">{arm}</span><b>{_e(_arm_name(bundle, arm))}</b>'
    if not answer:
        return f'<div class="col">{header}<div class="answer"><i>no answer logged</i></div></div>'
    sim = answer.get("simulated")
    meta = [_when(answer.get("ts")), answer.get("status")]
    if answer.get("assigned_arm") and answer.get("assigned_arm") != arm:
        meta.append(f"fallback from {answer['assigned_arm']}")
    parts = [f'<div class="col">{header} <span class="pill {"warn" if sim else "muted"}">'
             f'{"simulated user" if sim else "user"}</span>',
             f'<div class="sub" style="color:#6b7280;font-size:12px">{_e(" · ".join(m for m in meta if m))}</div>']
    if show_query:
        parts.append(f'<div class="sub" style="font-size:12px"><b>query:</b> {_e(answer.get("query"))}</div>')
    parts.append(f'<div class="answer">{_e(answer.get("answer"))}</div>')
    parts.append(_feedback_html(answer.get("feedback") or [], bool(sim)))
    parts.append("</div>")
    return "".join(parts)


def _feedback_text(feedback: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for f in feedback:
        bits = []
        if f.get("thumbs"):
            bits.append(f"thumbs {f['thumbs']}")
        if f.get("rating") is not None:
            bits.append(f"rating {f['rating']}/5")
        if f.get("corrected_answer"):
            bits.append(f"correction: {f['corrected_answer']}")
        if f.get("comment"):
            bits.append(f"comment: {f['comment']}")
        if bits:
            lines.append("; ".join(bits))
    return lines


def _feedback_html(feedback: Sequence[dict[str, Any]], simulated: bool) -> str:
    lines = _feedback_text(feedback)
    who = '<span class="sim">SIMULATED feedback</span>' if simulated else "<b>feedback</b>"
    if not lines:
        return f'<div class="fb">{who}: none</div>' if simulated else '<div class="fb">no feedback</div>'
    return f'<div class="fb">{who}: ' + "<br>".join(_e(line) for line in lines) + "</div>"


def _offline_section(bundle: dict[str, Any]) -> str:
    gate = bundle.get("offline_gate")
    lead = "The adapter's offline evaluation on the training holdout, before any user saw it."
    if not gate:
        return _card("Offline gate", lead, '<div class="empty">The candidate is not a registered adapter: '
                     "no offline gate was run for it.</div>", anchor="offline")
    if gate.get("missing"):
        return _card("Offline gate", lead, f'<div class="empty">Adapter {_e(gate.get("adapter_id"))} is not in the '
                     "adapters table.</div>", anchor="offline")
    evaluation = gate.get("eval_metrics") or {}
    train = gate.get("train_metrics") or {}
    body = [f'<p><b>{_e(gate.get("name"))}</b> on {_e(gate.get("base_model"))} · registered '
            f'{_e(_when(gate.get("created_at")))}'
            + (f' · dataset {_e(str(gate.get("dataset_hash"))[:12])}' if gate.get("dataset_hash") else "") + "</p>"]
    if not evaluation:
        body.append('<div class="empty">No offline evaluation recorded for this adapter.</div>')
    else:
        passed = evaluation.get("passed")
        body.append(f'<p><span class="pill {"good" if passed else "bad"}">'
                    f'{"gate passed" if passed else "gate failed"}</span> '
                    + _e("; ".join(evaluation.get("reasons") or [])) + "</p>")
        holdout, answers = evaluation.get("holdout") or {}, evaluation.get("answers") or {}
        rows = []
        for label, key, fmt in (("holdout loss", "loss", "{:.4f}"), ("holdout perplexity", "perplexity", "{:.2f}")):
            base, tuned = _num(holdout.get(f"{key}_base")), _num(holdout.get(f"{key}_adapter"))
            rows.append((label, base, tuned, fmt, "lower is better"))
        for label, key in (("ROUGE-L vs reference", "rouge_l"), ("similarity vs reference", "similarity")):
            rows.append((label, _num(answers.get(f"{key}_base")), _num(answers.get(f"{key}_adapter")), "{:.4f}",
                         "higher is better"))
        table = "".join(
            f"<tr><td>{_e(label)}<span class=sub>{_e(better)}</span></td>"
            f'<td class="num">{_e(fmt.format(b) if b is not None else "–")}</td>'
            f'<td class="num">{_e(fmt.format(t) if t is not None else "–")}</td>'
            f'<td class="num">{_e(f"{t - b:+.4f}" if b is not None and t is not None else "–")}</td></tr>'
            for label, b, t, fmt, better in rows if b is not None or t is not None)
        if table:
            body.append('<table class="compact"><thead><tr><th>offline metric</th><th class=num>base</th>'
                        "<th class=num>adapter</th>"
                        f"<th class=num>change</th></tr></thead><tbody>{table}</tbody></table>")
        facts = [("loss improvement", _pct(holdout.get("loss_improvement"), 2)),
                 ("required", _pct((evaluation.get("thresholds") or {}).get("min_loss_improvement"), 2)),
                 ("holdout rows", holdout.get("n")), ("answers compared", answers.get("n"))]
        body.append('<p class="lead" style="margin-top:10px">' + " · ".join(
            f"{_e(k)} {_e(v)}" for k, v in facts if v not in (None, "–")) + "</p>")
    train_facts = [("train rows", train.get("train_rows")), ("holdout rows", train.get("holdout_rows")),
                   ("final train loss", _fixed(train.get("train_loss_final"))),
                   ("train tokens", train.get("train_tokens")), ("wall time", _seconds(train.get("wall_time_s")))]
    shown = [(k, v) for k, v in train_facts if v not in (None, "")]
    if shown:
        body.append("<h3>Training</h3><p class=lead>" + " · ".join(f"{_e(k)} {_e(v)}" for k, v in shown) + "</p>")
    return _card("Offline gate", lead, "".join(body), anchor="offline")


def _fixed(value: Any) -> str | None:
    v = _num(value)
    return None if v is None else f"{v:.4f}"


def _seconds(value: Any) -> str | None:
    v = _num(value)
    return None if v is None else f"{v:,.0f} s"


def _footer(bundle: dict[str, Any]) -> str:
    analysis = bundle.get("analysis") or {}
    method = (analysis.get("sequential") or {}).get("method")
    notes = "".join(f"<li>{_e(note)}</li>" for note in METHOD_NOTES)
    if method:
        notes += f"<li>Interval method: {_e(method)}.</li>"
    return (f'<footer><div class="wrap"><section class="card"><h2>Method notes</h2><ul class="notes">{notes}</ul>'
            f"</section>Generated {_e(_when(bundle.get('generated_at')))} by abloop · analysis evaluated "
            f"{_e(_when(analysis.get('evaluated_at')))} · a self-contained file: no scripts, nothing fetched."
            "</div></footer>")


# -------------------------------------------------------------------------------------------------- markdown


def _md(value: Any) -> str:
    """A table cell: no line breaks or pipes, and no raw HTML (artifact viewers may render it)."""
    text = ("" if value is None else str(value)).replace("&", "&amp;").replace("<", "&lt;")
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_text(value: Any) -> str:
    """Text from users or models: no emphasis, code, links or images either (an image would be fetched on view).

    Backslash escapes only; `_md` (or `_md_table`, which applies it) still makes it one safe line.
    """
    text = "" if value is None else str(value)
    for char in "\\`*_[]!~":
        text = text.replace(char, "\\" + char)
    return text


def _md_table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines.extend("| " + " | ".join(_md(c) for c in row) + " |" for row in rows)
    return lines


def to_markdown(bundle: dict[str, Any]) -> str:
    """The report's content as markdown (a Prefect artifact): the same sections, tables instead of charts."""
    experiment = bundle.get("experiment") or {}
    analysis = bundle.get("analysis") or {}
    action, headline, _tone, reason = _verdict(bundle)
    metric = analysis.get("primary_metric") or "satisfaction"
    title = f"Experiment {experiment['id'][:8]}" if experiment.get("id") else "Experiment report"
    out = [f"# {_md(title)} ({_md(experiment.get('status') or 'no experiment')})", ""]
    if experiment:
        control, candidate = (_md(_md_text(_arm_name(bundle, arm))) for arm in ARMS)
        out.append(f"`{_md(experiment.get('id'))}` · control **{control}** vs candidate **{candidate}** · "
                   f"share {_pct(experiment.get('candidate_share'))} · "
                   f"report on {_md(bundle.get('selection'))}")
        out.append("")
    banner = _simulated_text(bundle.get("simulated"))
    if banner:
        out += [f"> **{_md(banner)}**", ""]
    out += ["## Verdict", "", f"**{_md(headline)}** (`{_md(action)}`): {_md(reason)}", ""]
    recorded = experiment.get("recorded_decision") or {}
    if recorded:
        out += [f"Recorded on the experiment: {_md(recorded.get('action') or experiment.get('status'))} - "
                f"{_md(recorded.get('reason'))}", ""]
    primary = analysis.get("primary") or {}
    if primary:
        out += [f"Primary metric **{_md(metric)}**: difference {_delta(metric, primary.get('difference'))}, "
                f"always-valid 95% interval {_interval(metric, primary.get('ci'))}, chance to win "
                f"{_pct(primary.get('chance_to_win'), 1)}.", ""]
    arms = analysis.get("arms") or {}
    out += ["## Per-arm figures", ""]
    out += _md_table(["figure", f"control ({_md_text(_arm_name(bundle, 'control'))})",
                      f"candidate ({_md_text(_arm_name(bundle, 'candidate'))})"],
                     [(label, *(_value(kind, (arms.get(arm) or {}).get(key)) for arm in ARMS))
                      for key, label, kind in _ARM_ROWS if any((arms.get(arm) or {}).get(key) is not None
                                                               for arm in ARMS)])
    metrics = analysis.get("metrics") or {}
    rows = [(name + (" (primary)" if name == metric else ""), _value(name, c.get("control")),
             _value(name, c.get("candidate")), _delta(name, c.get("difference")), _interval(name, c.get("ci")),
             _pct(c.get("chance_to_win"), 1), _p((c.get("fixed_horizon") or {}).get("p_value")))
            for name, c in metrics.items() if c]
    if rows:
        out += ["", "## Metrics (candidate − control)", ""]
        out += _md_table(["metric", "control", "candidate", "difference", "always-valid 95% interval",
                          "chance to win", "fixed-horizon p (reference only)"], rows)
    results = (analysis.get("guardrails") or {}).get("results") or {}
    if results:
        out += ["", "## Guardrails", ""]
        out += _md_table(["guardrail", "status", "margin", "difference", "always-valid 95% interval"],
                         [(name, r.get("status"), _delta(name, r.get("margin"), sign=False),
                           _delta(name, r.get("difference")), _interval(name, r.get("ci")))
                          for name, r in results.items()])
    transitions = bundle.get("transitions") or []
    if transitions:
        out += ["", "## Rollout & transitions", ""]
        out += _md_table(["time", "kind", "share", "reason"],
                         [(_when(t.get("ts")), t.get("kind"), _share_move(t), t.get("reason")) for t in transitions])
    phases = analysis.get("phases") or []
    if phases:
        out += ["", "## Sample-ratio check per phase", ""]
        out += _md_table(["phase", "share", "users control / candidate", "p-value", "split"],
                         [(p.get("index", 0) + 1, _pct(p.get("share")),
                           " / ".join(str(u) for u in p.get("users") or []), _p(p.get("p_value")),
                           _split(p)) for p in phases])
    examples = (bundle.get("examples") or {}).get("rows") or []
    if examples:
        out += ["", "## Example answers side by side", ""]
        out += _md_table(["query", "control", "candidate"],
                         [(_md_text(row.get("query")) if row.get("query") else "(latest per arm)",
                           *(_md_answer((row.get("arms") or {}).get(arm)) for arm in ARMS)) for row in examples])
    gate = bundle.get("offline_gate") or {}
    evaluation = gate.get("eval_metrics") or {}
    if gate:
        holdout = evaluation.get("holdout") or {}
        verdict = "passed" if evaluation.get("passed") else ("failed" if evaluation else "not evaluated")
        out += ["", "## Offline gate", "",
                f"Adapter **{_md(gate.get('name') or gate.get('adapter_id'))}**: gate {verdict}; holdout loss base "
                f"{_fixed(holdout.get('loss_base')) or '-'}, adapter {_fixed(holdout.get('loss_adapter')) or '-'}."
                + (f" {_md('; '.join(evaluation.get('reasons') or []))}" if evaluation.get("reasons") else "")]
    out += ["", "## Method", ""] + [f"- {note}" for note in METHOD_NOTES]
    out += ["", f"_Generated {_when(bundle.get('generated_at'))}._"]
    return "\n".join(out) + "\n"


def _split(phase: dict[str, Any]) -> str:
    if phase.get("mismatch"):
        return "MISMATCH"
    return "not testable" if phase.get("p_value") is None else "ok"


def _md_answer(answer: dict[str, Any] | None) -> str:
    if not answer:
        return "(no answer)"
    feedback = "; ".join(_feedback_text(answer.get("feedback") or []))
    who = "SIMULATED user" if answer.get("simulated") else "user"
    return f"{_md_text(answer.get('answer'))} ({who}; feedback: {_md_text(feedback) if feedback else 'none'})"


# ---------------------------------------------------------------------------------------------------- write


def write_report(db: Database, experiment_id: str | None = None, out_dir: Path = Path("reports"),
                 policy: Policy | None = None) -> Path:
    """Write `experiment-<id8>.html` and `latest.html` into `out_dir`; returns the former."""
    bundle = gather(db, experiment_id, policy)
    page = render_html(bundle)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    experiment = bundle.get("experiment") or {}
    path = out_dir / f"experiment-{(experiment.get('id') or 'none')[:8]}.html"
    for target in (path, out_dir / "latest.html"):
        _write_atomically(target, page)
    return path


def _write_atomically(path: Path, text: str) -> None:
    """A browser or a file server reading the report never sees half of it."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)

