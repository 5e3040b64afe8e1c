"""The weekly report as a message for a Slack-compatible incoming webhook: Block Kit, pure, no I/O.

The headline figures of all traffic with their change from last week, one line per arm, how many queries wait
for review, the simulated-traffic warning, and a link to the full report. No query or answer text goes into
the message: it would leave the report's readers for a chat channel's. `text` is the notification's fallback.
"""

from __future__ import annotations

from typing import Any

from experiment.metrics import ARMS
from experiment.report.content import (
    _MISS_LISTS,
    _WEEKLY_ROWS,
    WEEKLY_SIMULATED_WHERE,
    _simulated_text,
    _weekly_cell,
    _weekly_title,
)
from experiment.report.format import _change, _change_interval

_HEADER_CHARS = 150  # Block Kit's limit for a header's text
_FIELDS = 10  # and for a section's fields


def weekly_message(bundle: dict[str, Any], link: str) -> dict[str, Any]:
    """The Block Kit payload: `link` is the report's URL (a button) or, without REPORT_BASE_URL, its file path."""
    overall = (bundle.get("groups") or {}).get("overall") or {}
    fields = [{"type": "mrkdwn", "text": f"*{_escape(label)}*\n{_escape(_figure(overall, key, kind, count))}"}
              for key, label, kind, count in _WEEKLY_ROWS][:_FIELDS]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _weekly_title(bundle)[:_HEADER_CHARS]}}]
    simulated = _simulated_text((bundle.get("simulated") or {}).get("both"), WEEKLY_SIMULATED_WHERE)
    if simulated:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f":warning: *{_escape(simulated)}*"}})
    blocks += [
        {"type": "section", "text": {"type": "mrkdwn", "text": "*All traffic*, this week (change from last week)"},
         "fields": fields},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": _escape(_arm_line(bundle, arm))} for arm in ARMS]},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": _escape(_review_line(bundle))}]},
    ]
    if link.startswith(("https://", "http://")):
        blocks.append({"type": "actions", "elements": [
            {"type": "button", "text": {"type": "plain_text", "text": "Open the weekly report"}, "url": link}]})
    else:  # a path on the machine that ran the flow: Slack cannot link it, so it is shown as text
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"Report: `{_escape(link)}`"}]})
    return {"text": _fallback(bundle, overall, bool(simulated)), "blocks": blocks}


def _figure(group: dict[str, Any], key: str, kind: str, count: str | None) -> str:
    change = (group.get("change") or {}).get(key) or {}
    text = f"{_weekly_cell(group.get('this'), key, kind, count)} ({_change(change.get('relative'))})"
    return f"{text} 95% {_change_interval(change['ci'])}" if change.get("ci") else text


def _arm_line(bundle: dict[str, Any], arm: str) -> str:
    group = (bundle.get("groups") or {}).get(arm) or {}
    shown = [(label, _figure(group, key, kind, None)) for key, label, kind, _count in _WEEKLY_ROWS
             if key in ("requests", "thumbs_up_per_request", "mean_rating", "error_rate")]
    return f"{arm}: " + " · ".join(f"{label} {text}" for label, text in shown)


def _review_line(bundle: dict[str, Any]) -> str:
    misses = bundle.get("misses") or {}
    counts = [f"{len(misses.get(key) or [])} {heading.lower()}" for key, heading, _worst in _MISS_LISTS]
    return "Queries to review in the report: " + ", ".join(counts)


def _fallback(bundle: dict[str, Any], overall: dict[str, Any], simulated: bool) -> str:
    requests = _figure(overall, "requests", "int", None)
    thumbs = _figure(overall, "thumbs_up_per_request", "thumbs_up_per_request", None)
    flag = " (SIMULATED traffic)" if simulated else ""
    return _escape(f"{_weekly_title(bundle)}{flag}: requests {requests}, thumbs-up per request {thumbs}")


def _escape(text: str) -> str:
    """Slack's mrkdwn reads <, > and & as control characters (links, mentions): they must be entities."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
