"""The weekly HTML report as a browser shows it: headless Chromium renders the file offline, its sections and the
by-day chart are in the rendered DOM, and the screenshot is a real page. The same browser rules as the experiment
report's check (test_report_browser.py): without Chromium this fails, unless ABLOOP_SKIP_BROWSER=1.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from experiment.report import write_weekly_report
from store.db import Database
from tests.abloop.test_report_browser import WINDOW, _chromium, _run
from tests.experiment.test_weekly import WEEK_ENDING, review_rows, two_weeks


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weekly")
    db = Database(f"sqlite:///{folder / 'abloop.db'}")
    db.migrate()
    review_rows(db, two_weeks(db, prefix="sim-user", users=(120, 160)))
    return write_weekly_report(db, WEEK_ENDING, folder / "reports")


def test_chromium_renders_the_weekly_sections_and_the_chart(report, tmp_path):
    dom = _run(_chromium(), tmp_path / "profile", "--dump-dom", report.resolve().as_uri()).stdout
    for section in ("This week", "Week over week", "By day", "Miss queries to review", "Prompt templates",
                    "What the arms were", "Method notes"):
        assert f"<h2>{section}</h2>" in dom
    assert dom.count('<svg class="chart"') == 1 and dom.count("<polyline") == 2
    assert "SIMULATED" in dom and "<script" not in dom.lower() and "&lt;script&gt;" in dom


def test_the_weekly_screenshot_is_a_full_page(report, tmp_path):
    shot = tmp_path / "weekly.png"
    _run(_chromium(), tmp_path / "profile", f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
         report.resolve().as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == WINDOW
    assert len(data) > 60_000, f"screenshot is only {len(data)} bytes"  # a blank page compresses to a few kB
