"""The report's content as markdown (a Prefect artifact): the same sections as the page, tables instead of charts.

Text from users and models is quoted so that an artifact viewer renders no HTML, link or image from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from experiment.metrics import ARMS
from experiment.report.content import (
    _ARM_ROWS,
    METHOD_NOTES,
    _arm_name,
    _feedback_text,
    _share_move,
    _simulated_text,
    _verdict,
)
from experiment.report.format import _delta, _fixed, _interval, _p, _pct, _value, _when


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
    out += ["## Verdict", "", f"**{_md(headline)}** (`{_md(action)}`): {_md(_md_text(reason))}", ""]
    recorded = experiment.get("recorded_decision") or {}
    if recorded:
        out += [f"Recorded on the experiment: {_md(recorded.get('action') or experiment.get('status'))} - "
                f"{_md(_md_text(recorded.get('reason')))}", ""]
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
                         [(_when(t.get("ts")), t.get("kind"), _share_move(t), _md_text(t.get("reason")))
                          for t in transitions])
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
        adapter = _md(_md_text(gate.get("name") or gate.get("adapter_id")))
        reasons = _md(_md_text("; ".join(evaluation.get("reasons") or [])))
        out += ["", "## Offline gate", "",
                f"Adapter **{adapter}**: gate {verdict}; holdout loss base "
                f"{_fixed(holdout.get('loss_base')) or '-'}, adapter {_fixed(holdout.get('loss_adapter')) or '-'}."
                + (f" {reasons}" if reasons else "")]
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
