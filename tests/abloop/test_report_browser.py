"""The HTML report as a browser shows it: headless Chromium renders the file offline, the verdict and the
SVG charts are in the rendered DOM, and the screenshot is a real page, not a blank one.

Chromium is Debian's `chromium` package (`.ci/run` installs it when missing). A machine without it
fails here on purpose, so CI cannot pass without ever rendering the report; ABLOOP_SKIP_BROWSER=1
skips these tests where no browser can be installed.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from experiment.report import SIMULATED_BANNER, write_report
from store.db import Database
from tests.experiment.test_report import populate

BROWSERS = ("chromium", "chromium-browser")
WINDOW = (1280, 2400)


def _chromium() -> str:
    if os.environ.get("ABLOOP_SKIP_BROWSER") == "1":
        pytest.skip("ABLOOP_SKIP_BROWSER=1: the report is not rendered in a browser")
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("Chromium is not installed, so the HTML report cannot be checked in a browser: install it with "
                "`apt-get update && apt-get install -y chromium` (.ci/run does), or set ABLOOP_SKIP_BROWSER=1 "
                "to skip this test", pytrace=False)


def _run(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    db = Database(f"sqlite:///{folder / 'abloop.db'}")
    db.migrate()
    populate(db)
    return write_report(db, out_dir=folder / "reports")


def test_chromium_renders_the_verdict_and_the_charts(report, tmp_path):
    browser = _chromium()
    dom = _run(browser, tmp_path / "profile", "--dump-dom", report.resolve().as_uri()).stdout
    assert "Promote the candidate" in dom and SIMULATED_BANNER in dom
    assert dom.count('<svg class="chart"') == 2 and dom.count("<polyline") >= 3 and dom.count("<polygon") >= 3
    for section in ("Primary metric over time", "Metrics per arm", "Guardrails", "Rollout &amp; transitions",
                    "Sample-ratio check per phase", "Example answers side by side", "Offline gate"):
        assert f"<h2>{section}</h2>" in dom
    assert "<script" not in dom.lower() and "&lt;script&gt;" in dom  # the model's script stays text


def test_the_screenshot_is_a_full_page(report, tmp_path):
    browser = _chromium()
    shot = tmp_path / "report.png"
    _run(browser, tmp_path / "profile", f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
         report.resolve().as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == WINDOW  # the IHDR chunk: width, height
    # A blank or unstyled page of this size compresses to a few kB; charts, tables and text do not.
    assert len(data) > 60_000, f"screenshot is only {len(data)} bytes"
    if os.environ.get("ABLOOP_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["ABLOOP_KEEP_SCREENSHOT"])
