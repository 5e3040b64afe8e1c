"""The weekly report's content as markdown (the flow's Prefect artifact): the page's sections, tables for charts.

Queries and answers come from users and models: `_md_text` quotes them so an artifact viewer renders nothing of theirs.
"""

from __future__ import annotations

from typing import Any

from experiment.report.content import (
    _MISS_LISTS,
    _WEEKLY_GROUPS,
    _WEEKLY_ROWS,
    WEEKLY_NOTES,
    WEEKLY_SIMULATED_WHERE,
    _feedback_text,
    _miss_who,
    _simulated_text,
    _truncate,
    _weekly_cell,
    _weekly_title,
    _worst_feedback,
)
from experiment.report.format import _change, _change_interval, _value, _when
from experiment.report.markdown import _md, _md_table, _md_text


def weekly_to_markdown(bundle: dict[str, Any], link: str | None = None) -> str:
    """The weekly report as markdown; `link` (the HTML report's address) goes under the title."""
    week = bundle.get("week") or {}
    out = [f"# {_md(_weekly_title(bundle))}", ""]
    this, last = week.get("this") or ["", ""], week.get("last") or ["", ""]
    out += [f"This week from {_when(this[0], False)} to {_when(this[1], False)}, against the week before "
            f"(from {_when(last[0], False)})." + (f" Full report: {_md(link)}" if link else ""), ""]
    banner = _simulated_text((bundle.get("simulated") or {}).get("both"), WEEKLY_SIMULATED_WHERE)
    if banner:
        out += [f"> **{_md(banner)}**", ""]
    groups = bundle.get("groups") or {}
    for name, heading in _WEEKLY_GROUPS.items():
        group = groups.get(name) or {}
        changes = group.get("change") or {}
        out += [f"## {heading}", ""]
        out += _md_table(["figure", "last week", "this week", "change", "95% interval of the change"],
                         [(label, _weekly_cell(group.get("last"), key, kind, count),
                           _weekly_cell(group.get("this"), key, kind, count),
                           _change((changes.get(key) or {}).get("relative")),
                           _change_interval((changes.get(key) or {}).get("ci")))
                          for key, label, kind, count in _WEEKLY_ROWS])
        out.append("")
    misses = bundle.get("misses") or {}
    out += ["## Miss queries to review", ""]
    for key, heading, worst in _MISS_LISTS:
        rows = misses.get(key) or []
        out += [f"### {heading}", ""]
        if not rows:
            out += ["None this week.", ""]
            continue
        out += _md_table(["query", "times", "worst", "arm", "answer (worst case)", "who"],
                         [(_md_text(_truncate(m.get("query") or "", 200)), m.get("events"), _worst(m, worst),
                           m.get("arm"), _md_text(_truncate(m.get("answer") or "")) or "(no answer)",
                           _miss_who(m) or "user")
                          for m in rows])
        out.append("")
    templates = bundle.get("templates") or []
    if templates:
        out += ["## Prompt templates", ""]
        out += _md_table(["template", "version", "requests", "users", "latency p95", "thumbs-up per request",
                          "vs last week", "mean rating"],
                         [(_md_text(t.get("name") or (t.get("template_id") or "")[:8] or "(no template)"),
                           t.get("version"),
                           t.get("requests"), t.get("users"), _value("latency_p95_ms", t.get("latency_p95_ms")),
                           _value("thumbs_up_per_request", (t.get("thumbs_up_per_request") or {}).get("value")),
                           _change((t.get("thumbs_up_change") or {}).get("relative")),
                           _value("mean_rating", (t.get("mean_rating") or {}).get("value"))) for t in templates])
        out.append("")
    out += ["## Method", ""] + [f"- {note}" for note in WEEKLY_NOTES]
    out += ["", f"_Generated {_when(bundle.get('generated_at'))}._"]
    return "\n".join(out) + "\n"


def _worst(miss: dict[str, Any], worst: str | None) -> str:
    if worst == "satisfaction":
        return _md_text("; ".join(_feedback_text([_worst_feedback(miss)])))
    if worst == "score" and miss.get("worst") is not None:
        return f"{miss['worst']:.2f} ({miss.get('method')})"
    return ""
