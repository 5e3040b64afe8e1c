"""The operator reports: one experiment's (HTML and markdown) and the weekly report (HTML, markdown, Slack).

An operator decides from the experiment page whether to trust a promotion or a roll back, so it shows the
verdict first and then everything behind it: the primary metric over time with its always-valid
band, every metric with its interval, guardrails, rollout transitions, the per-phase sample-ratio
check, real answers side by side and the adapter's offline gate.

`gather` reads the store (through the analysis and the store's queries) into a JSON-ready bundle;
`render_html` and `to_markdown` are pure functions of that bundle.

The weekly report (week over week per arm, `experiment.weekly`'s bundle) is drawn with the same pieces:
`weekly_html`, `weekly_markdown` (its Prefect artifact) and `slack` (the webhook message).

The package, one job a module: `gather` (reading the store), `page` (the frame, CSS, cards shared by both reports),
`html` (the experiment page), `charts` (the SVG), `markdown`, `content` (what every format says), `format` (value
formatters), `write` (the files). Importing it is cheap: numpy and scipy load only when `gather` runs an analysis.
"""

from __future__ import annotations

from experiment.report.content import ANSWER_CHARS, METHOD_NOTES, SIMULATED_BANNER
from experiment.report.gather import EXAMPLES, SIMULATED_PREFIX, gather
from experiment.report.html import END_KINDS, SHARE_KINDS, render_html
from experiment.report.markdown import to_markdown
from experiment.report.slack import weekly_message
from experiment.report.weekly_html import render_weekly_html
from experiment.report.weekly_markdown import weekly_to_markdown
from experiment.report.write import write_report, write_weekly_html, write_weekly_report

__all__ = [
    "ANSWER_CHARS",
    "END_KINDS",
    "EXAMPLES",
    "METHOD_NOTES",
    "SHARE_KINDS",
    "SIMULATED_BANNER",
    "SIMULATED_PREFIX",
    "gather",
    "render_html",
    "render_weekly_html",
    "to_markdown",
    "weekly_message",
    "weekly_to_markdown",
    "write_report",
    "write_weekly_html",
    "write_weekly_report",
]
