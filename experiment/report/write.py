"""Writing the reports' HTML files, each replaced atomically: the experiment report (one per experiment and
`latest.html`) and the weekly report (one per week and `weekly-latest.html`)."""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path
from typing import Any

from experiment.decision import Policy
from experiment.report.gather import gather
from experiment.report.html import render_html
from experiment.report.weekly_html import render_weekly_html
from store.db import Database


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


def write_weekly_report(db: Database, week_ending: date | None = None, out_dir: Path = Path("reports")) -> Path:
    """Gather the week ending `week_ending` (default: yesterday) and write it (`write_weekly_html`)."""
    from experiment.weekly import week_over_week  # it imports this package: import it when it is used

    return write_weekly_html(week_over_week(db, week_ending), out_dir)


def write_weekly_html(bundle: dict[str, Any], out_dir: Path = Path("reports")) -> Path:
    """Write `weekly-<week ending>.html` and `weekly-latest.html` into `out_dir`; returns the former."""
    page = render_weekly_html(bundle)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"weekly-{bundle['week']['ending']}.html"
    for target in (path, out_dir / "weekly-latest.html"):
        _write_atomically(target, page)
    return path


def _write_atomically(path: Path, text: str) -> None:
    """A browser or a file server reading the report never sees half of it."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
