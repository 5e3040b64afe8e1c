"""Observability overhead: the abloop proxy with text logs, JSON logs, and JSON logs plus exported traces.

Measures, side by side in one run, requests/s, p50 latency and server CPU per request at concurrency 1 and
64 of four proxies on the same stub upstream (retrieval off, unless --index-dir), each in its own process:

  (a) LOG_FORMAT=text, LOG_LEVEL=WARNING: nothing logged per request (the baseline);
  (b) LOG_FORMAT=json, LOG_LEVEL=INFO, traces off: a JSON line per search (store/logs.py);
  (c) as (b), plus traces exported over OTLP/HTTP (OTEL_EXPORTER_OTLP_ENDPOINT) to a local sink, a tiny HTTP
      server (this script, in its own process) that accepts POST /v1/traces and discards it;
  (d) as (c), with 1 trace in 10 sampled (OTEL_TRACES_SAMPLER=parentbased_traceidratio, ..._ARG=0.1).

The configurations alternate within each round (round 1: a b c d at c=1, a b c d at c=64; round 2 ...), the
report is the median over rounds, with each row's requests/s as a ratio of (a)'s and its p50 minus (a)'s, and
a 95% confidence interval of the ratio from the rounds' ratios (t interval of their logarithms). On a machine
of 2 or more CPUs each proxy is pinned to the last CPU and everything else (stub, sink, wrk, this script) to
the others (--no-pin: no pinning), so that the load generator does not take the measured proxy's CPU; and
the proxies not being measured are stopped (SIGSTOP) meanwhile, so that their idle work does not either.
Before measuring, the script checks that (b) writes JSON lines and that (c)'s spans reach the sink.
The issue's goal: (b) serves >= 95% of (a)'s requests/s.

Run from the repository root with the project venv:

    .venv/bin/python bench/observability_overhead.py [--rounds 3] [--duration 3] [--warmup 1]
                                                     [--concurrency 1,64] [--index-dir DIR] [--out FILE]

It reuses bench/proxy_overhead.py's servers, load generator (wrk if installed, else its asyncio one) and
measurement. Progress goes to stderr; the report (markdown) to stdout and --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from proxy_overhead import (
    PROJECT_PY,
    QUERIES,
    ROOT,
    WRK_SEARCH,
    Cell,
    Processes,
    Target,
    add_load_arguments,
    base_env,
    check,
    choose_wrk,
    fmt,
    fmt_added,
    free_port,
    has_index,
    http,
    log,
    measure_rounds,
    parse_concurrencies,
    start_abloop,
    start_stub,
    stop_on_signals,
    versions,
    wait_http,
)

GOAL_RPS_RATIO = 0.95  # JSON logs on, traces off: at most 5% fewer requests/s than the baseline


@dataclass(frozen=True)
class Setup:
    key: str
    label: str
    env: tuple[str, ...]  # KEY=VALUE for the proxy


def setups(sink_url: str) -> list[Setup]:
    return [
        Setup("a", "(a) text logs at WARNING (baseline)", ("LOG_FORMAT=text", "LOG_LEVEL=WARNING")),
        Setup("b", "(b) JSON logs at INFO, traces off", ("LOG_FORMAT=json", "LOG_LEVEL=INFO")),
        Setup("c", "(c) JSON logs at INFO + traces (OTLP/HTTP)",
              ("LOG_FORMAT=json", "LOG_LEVEL=INFO", f"OTEL_EXPORTER_OTLP_ENDPOINT={sink_url}")),
        # The lever a busy proxy would use: OTel's standard sampler variables, 1 trace in 10 recorded.
        Setup("d", "(d) as (c), 10% of traces sampled",
              ("LOG_FORMAT=json", "LOG_LEVEL=INFO", f"OTEL_EXPORTER_OTLP_ENDPOINT={sink_url}",
               "OTEL_TRACES_SAMPLER=parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG=0.1")),
    ]


# --------------------------------------------------------------------------------------------
# The OTLP sink (`--sink PORT`): its own process, so that it takes no CPU from the load generator's.


def run_sink(port: int) -> None:
    stats = {"posts": 0, "bytes": 0}

    class Sink(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a collector would

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/v1/traces":
                stats["posts"] += 1
                stats["bytes"] += len(body)
            self._answer(200 if self.path == "/v1/traces" else 404, b"", "application/x-protobuf")

        def do_GET(self) -> None:  # noqa: N802
            self._answer(200, json.dumps(stats).encode(), "application/json")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()


def sink_stats(url: str) -> dict[str, int]:
    status, body = http("GET", f"{url}/stats")
    if status != 200:
        raise RuntimeError(f"OTLP sink: HTTP {status}")
    return json.loads(body)


# --------------------------------------------------------------------------------------------


def paired(samples: dict[tuple[str, int], list[Cell]], key: str, c: int, measure_of: Any) -> float:
    """The median over rounds of `measure_of(cell, baseline cell of the same round)`.

    Pairing each round with (a)'s round cancels most of the drift in the machine's other load.
    """
    values = [measure_of(cell, base) for cell, base in zip(samples[(key, c)], samples[("a", c)], strict=True)]
    values = [v for v in values if v == v]  # NaN: a cell with no completed request
    return statistics.median(values) if values else float("nan")


def ratio_interval(samples: dict[tuple[str, int], list[Cell]], key: str, c: int) -> tuple[float, float, float]:
    """Geometric mean of the rounds' requests/s ratios against (a), and its 95% t interval."""
    from scipy import stats

    logs = [math.log(r) for r in (rps_ratio(cell, base) for cell, base in
                                  zip(samples[(key, c)], samples[("a", c)], strict=True)) if r == r and r > 0]
    if len(logs) < 2:
        return (math.exp(logs[0]), float("nan"), float("nan")) if logs else (float("nan"),) * 3
    mean, sem = statistics.fmean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
    half = stats.t.ppf(0.975, len(logs) - 1) * sem
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def rps_ratio(cell: Cell, base: Cell) -> float:
    return cell.rps / base.rps if base.rps > 0 else float("nan")


def cpu_ratio(cell: Cell, base: Cell) -> float:
    return cell.cpu_ms / base.cpu_ms if base.cpu_ms > 0 else float("nan")


def added_p50(cell: Cell, base: Cell) -> float:
    return cell.p50_ms - base.p50_ms


def _fewer(ratio: float) -> str:
    return f"{(1 - ratio) * 100:.1f}% fewer" if ratio <= 1 else f"{(ratio - 1) * 100:.1f}% more"


def report(args: argparse.Namespace, header: list[str], runs: list[Setup],
           samples: dict[tuple[str, int], list[Cell]]) -> str:
    results = {key: Cell.median(value) for key, value in samples.items()}
    lines = list(header)
    lines.append("")
    columns = ["Configuration"]
    for c in args.concurrencies:
        columns += [f"c={c} req/s", f"c={c} req/s ÷ (a)", f"c={c} p50 ms", f"c={c} +p50 ms vs (a)",
                    f"c={c} CPU ms/req", f"c={c} CPU ÷ (a)"]
    columns.append("errors")
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|")
    for setup in runs:
        row = [setup.label]
        errors = 0
        for c in args.concurrencies:
            cell = results[(setup.key, c)]
            errors += cell.errors
            if setup.key == "a":
                row += [f"{cell.rps:,.0f}", "1", fmt(cell.p50_ms), "—", fmt(cell.cpu_ms, 3), "1"]
                continue
            row += [f"{cell.rps:,.0f}", fmt(paired(samples, setup.key, c, rps_ratio), 3), fmt(cell.p50_ms),
                    fmt_added(paired(samples, setup.key, c, added_p50)), fmt(cell.cpu_ms, 3),
                    fmt(paired(samples, setup.key, c, cpu_ratio), 3)]
        row.append(str(errors))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("req/s, p50 and CPU ms/req: medians over the rounds. ÷ (a) and +p50: medians over the rounds of each "
                 "round's figure against (a)'s in the same round.")
    lines.append("")
    lines.append("Per round (req/s, and ÷ (a) in the same round):")
    lines.append("")
    for c in args.concurrencies:
        for setup in runs[1:]:
            pairs = zip(samples[(setup.key, c)], samples[("a", c)], strict=True)
            per_round = ", ".join(f"{cell.rps:,.0f} ({rps_ratio(cell, base):.3f})" for cell, base in pairs)
            lines.append(f"- c={c} {setup.label}: {per_round}")
    lines.append("")
    lines.append(f"Goal: (b) JSON logs on, traces off, serves >= {GOAL_RPS_RATIO:.0%} of (a)'s requests/s.")
    for c in args.concurrencies:
        logs, traced = paired(samples, "b", c, rps_ratio), paired(samples, "c", c, rps_ratio)
        sampled = paired(samples, "d", c, rps_ratio)
        if logs != logs:
            lines.append(f"- c={c}: n/a ((a) completed no request)")
            continue
        mean, low, high = ratio_interval(samples, "b", c)
        verdict = "MET" if logs >= GOAL_RPS_RATIO else "NOT MET"
        if low == low:
            verdict += f" (the interval's low end {'clears' if low >= GOAL_RPS_RATIO else 'is below'} it)"
        lines.append(f"- c={c}: (b) {logs:.3f}× (a)'s requests/s ({_fewer(logs)}), geometric mean {mean:.3f}×, "
                     f"95% CI {low:.3f}–{high:.3f} → {verdict}; with traces exported, (c) {traced:.3f}× "
                     f"({_fewer(traced)}); 10% of them, (d) {sampled:.3f}× ({_fewer(sampled)})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser, duration=3, warmup=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the report is their median")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers per proxy (default 1)")
    parser.add_argument("--index-dir", type=Path, help="an index built by `abloop index build` (retrieval on); "
                        "default: none (retrieval off)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin the proxies to the last CPU and the rest to the others")
    parser.add_argument("--sink", type=int, metavar="PORT", help=argparse.SUPPRESS)  # run as the OTLP sink
    args = parser.parse_args(argv)
    args.concurrencies = parse_concurrencies(args.concurrency)
    if not args.concurrencies or min(args.concurrencies) < 1 or min(args.duration, args.rounds, args.workers) < 1:
        parser.error("--concurrency, --duration, --rounds and --workers must be positive")
    if args.index_dir is not None and not has_index(args.index_dir):
        parser.error(f"no index in {args.index_dir}: build one with `abloop index build`")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sink is not None:
        run_sink(args.sink)
        return 0
    stop_on_signals()
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    wrk = choose_wrk(args.loadgen)

    proxy_cpus = _pin_apart() if args.pin else None
    tmp = Path(tempfile.mkdtemp(prefix="abloop-bench-obs-"))
    (tmp / "logs").mkdir()
    procs = Processes(tmp / "logs")
    try:
        stub_base, _ = start_stub(procs)
        sink_port = free_port()
        sink_url = f"http://127.0.0.1:{sink_port}"
        sink = procs.start("otlp-sink", [PROJECT_PY, str(Path(__file__).resolve()), "--sink", str(sink_port)],
                           env=base_env(), cwd=ROOT)
        wait_http(f"{sink_url}/stats", sink, procs, "otlp-sink", 30)

        runs = setups(sink_url)
        targets: dict[str, Target] = {}

        def search_body(worker: int, n: int) -> bytes:
            return json.dumps({"query": QUERIES[n % len(QUERIES)], "user_id": f"u{worker}-{n % 5000}"}).encode()

        for setup in runs:
            port = free_port()
            name = f"proxy-{setup.key}"
            index_dir = args.index_dir.resolve() if args.index_dir else tmp / f"index-{setup.key}"
            proc = start_abloop(procs, name, port, stub_base, index_dir, tmp, setup.env, workers=args.workers,
                                cpus=proxy_cpus)
            if args.index_dir:  # ready once the index and its embedder are loaded
                wait_http(f"http://127.0.0.1:{port}/readyz", proc, procs, name, 300,
                          ok=lambda status, body: status == 200 and json.loads(body).get("ready") is True)
            else:
                wait_http(f"http://127.0.0.1:{port}/healthz", proc, procs, name, 120)
            targets[setup.key] = Target(setup.key, setup.label, f"http://127.0.0.1:{port}/api/v1/search",
                                        WRK_SEARCH, {}, search_body, pgid=proc.pid)
            log(f"{setup.label} on :{port}")

        # Each configuration does what it says before it is measured.
        def answered(payload: dict[str, Any]) -> str | None:
            return None if payload.get("answer") else "no answer from the upstream"

        for setup in runs:
            check(targets[setup.key], answered, n=20)
        _check_json_lines(procs.log_dir / "proxy-b.log", minimum=20)
        _check_spans_exported(procs, sink_url)

        samples = measure_rounds(wrk, [targets[setup.key] for setup in runs], args.concurrencies, args.rounds,
                                 args.warmup, args.duration, pause_others=True)
        exported = sink_stats(sink_url)
        json_lines = _count_lines(procs.log_dir / "proxy-b.log", '"search answered"')
    finally:
        procs.stop_all()
        if args.keep_temp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    ours = versions(PROJECT_PY, ["fastapi", "uvicorn", "python-json-logger", "opentelemetry-sdk"])
    loadgen = "wrk" if wrk else "bench/proxy_overhead.py's asyncio HTTP/1.1 generator (wrk not installed)"
    header = [
        "# abloop proxy: observability overhead",
        "",
        f"- command: `{command}`",
        f"- date: {started.strftime('%Y-%m-%d %H:%M:%S UTC')}; nproc: {os.cpu_count()}; "
        f"load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}",
        f"- host: {platform.platform()}, Python {platform.python_version()}",
        "- " + ", ".join(f"{k} {v}" for k, v in ours.items()),
        f"- each proxy: `abloop proxy`, {args.workers} worker(s), 2 arms (candidate share 0.1) on one stub upstream, "
        + (f"retrieval on ({args.index_dir})" if args.index_dir else "retrieval off (empty index)"),
        f"- load: {loadgen}; `POST /api/v1/search`; {args.warmup} s warm-up + {args.duration} s per cell; "
        f"median of {args.rounds} rounds, the configurations alternating within each round",
        f"- (b) wrote {json_lines:,} \"search answered\" JSON lines; (c) exported {exported['posts']:,} OTLP posts "
        f"({exported['bytes'] / 1e6:.1f} MB) to the sink",
        "- CPU ms/req: user+system CPU of the proxy process ÷ requests (less sensitive than req/s to other load)",
        f"- CPUs: each proxy on CPU {proxy_cpus} (the others stopped while one is measured), the stub, sink, wrk and "
        "this script on the others" if proxy_cpus
        else "- CPUs: not pinned (--no-pin, or a single CPU)",
    ]
    text = report(args, header, runs, samples)
    print(text, flush=True)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def _pin_apart() -> str | None:
    """Keep the last usable CPU for the proxies (returned, in taskset's form) and move this process, and so
    every process it starts but the proxies, onto the others. None on one CPU or without taskset."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2 or shutil.which("taskset") is None:
        return None
    os.sched_setaffinity(0, usable[:-1])
    return str(usable[-1])


def _count_lines(path: Path, needle: str) -> int:
    with open(path, errors="replace") as lines:
        return sum(needle in line for line in lines)


def _check_json_lines(path: Path, minimum: int) -> None:
    """(b) logs each search: its INFO lines reach the file within store.logs.LineWriter's 0.1 s."""
    deadline = time.monotonic() + 10
    while True:
        found = [json.loads(line) for line in path.read_text(errors="replace").splitlines()
                 if '"search answered"' in line]
        if len(found) >= minimum and all("request_id" in line and "timings_ms" in line for line in found):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"(b) wrote {len(found)} 'search answered' JSON lines, expected >= {minimum}")
        time.sleep(0.1)


def _check_spans_exported(procs: Processes, sink_url: str) -> None:
    """(c) exports: its batch processor sends within its schedule delay (OTEL_BSP_SCHEDULE_DELAY, 5 s)."""
    deadline = time.monotonic() + 30
    while sink_stats(sink_url)["posts"] == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"(c) exported no span in 30 s; its log ends:\n{procs.log_tail('proxy-c')}")
        time.sleep(0.5)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; servers stopped")
        sys.exit(130)
