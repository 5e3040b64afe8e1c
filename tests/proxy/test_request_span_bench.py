"""bench/request_span.py runs (a few requests per mode) and prints one row per mode."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_request_span_bench_prints_a_row_per_mode():
    done = subprocess.run(
        [sys.executable, "bench/request_span.py", "--rounds", "1", "--requests", "20", "--sampled"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]) for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| mode")}
    assert {("off", "—"), ("own", "all"), ("fastapi", "all"), ("own", "10%"), ("fastapi", "10%")} <= rows
