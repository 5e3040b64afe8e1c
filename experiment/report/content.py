"""What the report says whatever its format: verdict headlines, arm names, the simulation banner, method notes.

`render_html` and `to_markdown` both draw on these, so the page and the markdown never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from experiment.decision import KEEP_RUNNING, NOT_ENOUGH_DATA, PROMOTE, ROLL_BACK
from experiment.report.format import _pct, _value
from experiment.status import arm_label


def _simulated_banner(where: str) -> str:
    return f"Traffic and feedback {where} were SIMULATED (sim- users); no person rated anything"


SIMULATED_BANNER = _simulated_banner("in this experiment")
ANSWER_CHARS = 400
_VERDICTS = {  # action -> (headline, css class)
    PROMOTE: ("Promote the candidate", "good"),
    ROLL_BACK: ("Roll back the candidate", "bad"),
    KEEP_RUNNING: ("Keep running", "warn"),
    NOT_ENOUGH_DATA: ("Not enough data", "muted"),
}
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
    "CUPED: where users gave feedback, or had answers scored, in the lookback before the experiment (14 days by "
    "default), that pre-period value of the metric is a covariate (regression adjustment), which narrows intervals "
    "without bias.",
    "Guardrails are one-sided tests against a margin on the always-valid interval, checked only after the minimum "
    "sample. The sample-ratio check is a chi-square per phase against that phase's share (p < 0.001 flags it).",
)


def _arm_name(bundle: dict[str, Any], arm: str) -> str:
    if not bundle.get("experiment"):
        return "–"
    return arm_label(bundle["experiment"].get(arm), arm)


def _verdict(bundle: dict[str, Any]) -> tuple[str, str, str, str]:
    """(action, headline, css class, reason) of the analysis' decision."""
    decision = (bundle.get("analysis") or {}).get("decision") or {}
    action = decision.get("action") or NOT_ENOUGH_DATA
    headline, tone = _VERDICTS.get(action, (action.replace("_", " ").capitalize(), "muted"))
    return action, headline, tone, decision.get("reason") or ""


def _simulated_text(simulated: dict[str, Any] | None, where: str = "in this experiment") -> str | None:
    """The banner for simulated traffic (sim- users), with its counts; None when none of it was simulated."""
    if not simulated or not simulated.get("any"):
        return None
    counts = (f"{simulated['simulated_events']:,} of {simulated['events']:,} requests from "
              f"{simulated['simulated_users']:,} simulated users; {simulated['simulated_feedback']:,} of "
              f"{simulated['feedback']:,} feedback rows on them")
    if simulated.get("all"):
        return f"{_simulated_banner(where)}. {counts}."
    return (f"Part of the traffic and feedback {where} was SIMULATED (sim- users): {counts}. "
            "Read the comparison with that in mind.")


def _truncate(text: str, limit: int = ANSWER_CHARS) -> str:
    """Answers and corrections are shown up to `limit` characters: the report is for reading, not for the archive."""
    return text if len(text) <= limit else text[:limit].rstrip() + "…"


def _share_move(t: dict[str, Any]) -> str:
    before, after = t.get("from_share"), t.get("to_share")
    if before is None and after is None:
        return "–"
    if before is None:
        return _pct(after)
    return f"{_pct(before)} → {_pct(after)}"


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


# The weekly report (experiment.weekly's bundle). Its rows: key, label, formatter, the count shown beside a rate.
_WEEKLY_ROWS = (
    ("requests", "requests", "int", None), ("users", "users", "int", None),
    ("thumbs_up_per_request", "thumbs-up per request", "thumbs_up_per_request", "thumbs_up"),
    ("mean_rating", "mean rating", "mean_rating", "ratings"),
    ("feedback_rate", "feedback rate", "feedback_rate", "feedback_events"),
    ("answer_score", "answer score", "answer_score", "grounding_n"),
    ("latency_p95_ms", "latency p95", "latency_p95_ms", None),
    ("error_rate", "errors", "error_rate", "errors"),
    ("fallback_rate", "fallbacks", "fallback_rate", "fallbacks"),
)
_WEEKLY_GROUPS = {"overall": "All traffic", "control": "Control arm", "candidate": "Candidate arm"}
_MISS_LISTS = (  # key, heading, what "worst" is
    ("lowest_rated", "Lowest-rated", "satisfaction"), ("lowest_score", "Lowest answer score", "score"),
    ("no_hits", "No retrieval hits", None),
)
WEEKLY_SIMULATED_WHERE = "in these two weeks"
WEEKLY_NOTES = (
    "The user is the unit: every rate is a ratio of per-user sums with a delta-method variance, so one user's many "
    "requests are not counted as independent trials.",
    "Change = this week / last week − 1. For a rate its 95% interval is the delta method on the ratio of the two "
    "weeks' estimates (GrowthBook's relative lift: Student t, Welch–Satterthwaite degrees of freedom), its lower end "
    "held at −100% (no rate here is negative). Counts and latency p95 (a quantile over requests) get the change "
    "without an interval, and so does a rate that fell to zero (the formula would call that change exact).",
    "The weeks are treated as independent samples although returning users are in both. Users' weeks are usually "
    "positively correlated, which makes these intervals conservative (wider than needed); they would be too narrow "
    "only if users' weeks were negatively correlated.",
    "Per arm means per assigned arm, whatever experiment assigned it: after a promotion an arm can be another model "
    "than the week before (see what the arms were). Requests without a user id are counted but left out of the "
    "per-user figures.",
    "Weeks are whole UTC days; feedback and answer scores count with the week of the request they are on.",
    "Miss queries are grouped by their text (case and spacing ignored); they are for a person to read, not a metric.",
)


def _weekly_title(bundle: dict[str, Any]) -> str:
    return f"Weekly report · week ending {(bundle.get('week') or {}).get('ending') or '–'}"


def _weekly_figure(figures: dict[str, Any] | None, key: str) -> Any:
    """A figure's value: rates are {value, ci, ...} in the bundle, counts and latencies plain numbers."""
    value = (figures or {}).get(key)
    return value.get("value") if isinstance(value, dict) else value


def _weekly_cell(figures: dict[str, Any] | None, key: str, kind: str, count: str | None) -> str:
    text = _value(kind, _weekly_figure(figures, key))
    if count and text != "–" and (figures or {}).get(count) is not None:
        text += f" ({figures[count]:,})"
    return text


def _change_tone(change: dict[str, Any] | None) -> str:
    """good / bad where the change's interval clears zero, by the metric's direction; muted otherwise."""
    ci, better_up = (change or {}).get("ci"), (change or {}).get("higher_is_better")
    if not ci or better_up is None or ci[0] is None or ci[1] is None or ci[0] <= 0 <= ci[1]:
        return "muted"
    return "good" if (ci[0] > 0) == better_up else "bad"


def _worst_feedback(miss: dict[str, Any]) -> dict[str, Any]:
    """The feedback row a lowest-rated miss carries, for `_feedback_text` (corrections shortened)."""
    corrected = miss.get("corrected_answer")
    return {"thumbs": miss.get("thumbs"), "rating": miss.get("rating"), "comment": miss.get("comment"),
            "corrected_answer": _truncate(corrected) if corrected else None}


def _miss_who(miss: dict[str, Any]) -> str | None:
    """Who asked a miss query, when simulated users did: a simulated query is labelled, never passed off as a user's."""
    simulated, events = miss.get("simulated_events", 0), miss.get("events", 0)
    if not simulated:
        return None
    return "SIMULATED user" if simulated == events else f"{simulated:,} of {events:,} SIMULATED"
