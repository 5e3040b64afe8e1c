"""The operator report of one experiment: one self-contained HTML file, and the same content as markdown.

An operator decides from this page whether to trust a promotion or a roll back, so it shows the
verdict first and then everything behind it: the primary metric over time with its always-valid
band, every metric with its interval, guardrails, rollout transitions, the per-phase sample-ratio
check, real answers side by side and the adapter's offline gate.

`gather` reads the store (through the analysis and the store's queries) into a JSON-ready bundle;
`render_html` and `to_markdown` are pure functions of that bundle.

The package, one job a module: `gather` (reading the store), `html` (the page and its CSS), `charts` (the
SVG), `markdown`, `content` (what both formats say), `format` (value formatters), `write` (the files).
Importing it is cheap: numpy and scipy load only when `gather` runs an analysis.
"""

from __future__ import annotations

from experiment.report.content import ANSWER_CHARS, METHOD_NOTES, SIMULATED_BANNER
from experiment.report.gather import EXAMPLES, SIMULATED_PREFIX, gather
from experiment.report.html import END_KINDS, SHARE_KINDS, render_html
from experiment.report.markdown import to_markdown
from experiment.report.write import write_report

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
    "to_markdown",
    "write_report",
]
