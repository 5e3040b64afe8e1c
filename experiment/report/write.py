"""Writing the report's HTML files: one per experiment and `latest.html`, each replaced atomically."""

from __future__ import annotations

import os
from pathlib import Path

from experiment.decision import Policy
from experiment.report.gather import gather
from experiment.report.html import render_html
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


def _write_atomically(path: Path, text: str) -> None:
    """A browser or a file server reading the report never sees half of it."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
