"""What the report says whatever its format: verdict headlines, arm names, the simulation banner, method notes.

`render_html` and `to_markdown` both draw on these, so the page and the markdown never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from experiment.decision import KEEP_RUNNING, NOT_ENOUGH_DATA, PROMOTE, ROLL_BACK
from experiment.report.format import _pct

SIMULATED_BANNER = "Traffic and feedback in this experiment were SIMULATED (sim- users); no person rated anything"
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
    "CUPED: where users gave feedback in the 14 days before the experiment, that pre-period value is a covariate "
    "(regression adjustment), which narrows intervals without bias.",
    "Guardrails are one-sided tests against a margin on the always-valid interval, checked only after the minimum "
    "sample. The sample-ratio check is a chi-square per phase against that phase's share (p < 0.001 flags it).",
)


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
