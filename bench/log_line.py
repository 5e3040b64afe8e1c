"""What one log line costs in process: the proxy's "search answered" line through store.logs, to /dev/null.

Prints a table of CPU microseconds per call (best of --repeats runs of --lines calls, one process) for: JSON at
INFO (the line written), text at INFO, and JSON at WARNING (the call made, the line filtered out by level).
The proxy pays more per line than this loop does (its code and data are not hot in the CPU's caches between two
searches); bench/observability_overhead.py measures the proxy itself.

    .venv/bin/python bench/log_line.py [--lines 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

# The tree this script sits in, before the installed one: a copy in a worktree of another commit measures that
# commit (docs/BENCHMARKS.md compares the trees before and after a change this way).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store.logs import bind, configure_logging  # noqa: E402

# The fields proxy/routes/search.py's _log_line logs, and the ones the request binds.
FIELDS = {"served_arm": "control", "status": "ok", "model": "stub-model",
          "timings_ms": {"retrieval": 0.182, "llm": 1.846, "total": 2.16}, "http_status": 200}
BOUND = {"request_id": "01a2282d-3314-7c9c-9556-1219fb39d59d", "experiment_id": "01a2282d-2e0e-7f05-81bb-a9566b9737ec",
         "arm": "control", "bucket": 5232}


def per_line_us(format: str, level: str, lines: int, repeats: int) -> float:
    with open(os.devnull, "w") as sink:
        configure_logging(format, level, secrets=["an-admin-token-value"], stream=sink)
        log = logging.getLogger("abloop.proxy")
        best = float("inf")
        with bind(**BOUND):
            for _ in range(repeats):
                started = time.process_time()
                for _ in range(lines):
                    log.info("search answered", extra=FIELDS)
                best = min(best, (time.process_time() - started) / lines * 1e6)
        logging.shutdown()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = [("JSON at INFO (written)", "json", "INFO"), ("text at INFO (written)", "text", "INFO"),
            ("JSON at WARNING (filtered out)", "json", "WARNING")]
    print(f"`{' '.join([Path(sys.executable).name, *sys.argv])}`, Python {sys.version.split()[0]}\n")
    print("| the search's line | CPU µs per call |")
    print("|---|---:|")
    for label, format, level in rows:
        print(f"| {label} | {per_line_us(format, level, args.lines, args.repeats):.1f} |")


if __name__ == "__main__":
    main()
