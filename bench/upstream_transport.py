"""Upstream transport: httpx's own pool against the hand-written HTTP/1.1 client (issue 11).

Measures, side by side in one run, the proxy's upstream call path (`proxy.upstream.Upstream.complete`:
one arm, JSON in and out, the breaker's bookkeeping) with each transport below, against

  * a stub that answers at once (`python -m serving.stub`), at concurrency 1 and 64: the client's
    own cost, as bench/proxy_overhead.py sees it;
  * an LLM-like stub (the same, `--delay-ms 500`) at concurrency 256 (UPSTREAM_MAX_CONNECTIONS'
    default): what a model server holding many requests at once looks like to the proxy.

Rows:
  * floor: no HTTP library, pre-built request bytes on one kept-alive socket per caller and the reply
    read by its content-length: loopback and the stub alone, so "+p50"/"+p99" are what each client
    adds;
  * httpx tuned: `httpx.AsyncHTTPTransport`, HTTP/1.1, no HTTP/2, keep-alive, limits
    max_connections = max_keepalive_connections = 256, keepalive_expiry 4 s;
  * httpx with 50 kept alive: the same, fewer idle connections kept than calls in flight;
  * httpx on httpcore2's pool (if installed; pydantic's fork, a dependency of huggingface_hub here):
    informational, for the pool fixes it carries;
  * hand-written: proxy/http1.py's `KeepAliveTransport`, as `Upstream` builds it.

Prints markdown tables: requests/s, p50/p99 latency of a call, latency added over the floor, the
client's CPU per call (this process's CPU ÷ calls: steadier than req/s on a shared box) and each row's
requests/s over the hand-written client's. Callers run a closed loop, their first calls spread out so
they do not arrive in lockstep; every cell is measured `--repeat` times, interleaved, and the median
reported. The client runs on uvloop, as the proxy does under uvicorn.

Run from the repository root with the project venv (about 80 s with the defaults; `--only` runs one
of the two parts):

    .venv/bin/python bench/upstream_transport.py [--duration 4] [--warmup 1] [--repeat 1]
        [--concurrency 1,64] [--llm-delay-ms 500] [--llm-concurrency 256] [--only instant|llm] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import uvloop
from proxy_overhead import (
    CHAT_MESSAGES,
    PROJECT_PY,
    ROOT,
    STUB_MODEL,
    Cell,
    Processes,
    base_env,
    chat_body,
    free_port,
    log,
    versions,
    wait_http,
)

from experiment.assignment import Arm
from proxy.http1 import KeepAliveTransport
from proxy.upstream import Target as UpstreamTarget
from proxy.upstream import Upstream
from store.config import Settings


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    transport: Callable[[], httpx.AsyncBaseTransport] | None  # None: the floor (no Upstream, no HTTP library)


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    delay_ms: float  # the stub's answer time
    concurrencies: list[int]


def _httpx_pool(max_connections: int, max_keepalive: int) -> httpx.AsyncHTTPTransport:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_keepalive,
                          keepalive_expiry=4.0)
    return httpx.AsyncHTTPTransport(limits=limits, http1=True, http2=False, retries=0)


def _httpcore2_pool(max_connections: int) -> httpx.AsyncHTTPTransport:
    """httpx's transport on httpcore2's pool (pydantic's fork, with the pool's O(n²) scans fixed).

    Enough for this benchmark's happy path only: httpx maps httpcore's exceptions, not httpcore2's.
    """
    import httpcore2

    transport = _httpx_pool(max_connections, max_connections)
    transport._pool = httpcore2.AsyncConnectionPool(max_connections=max_connections,
                                                    max_keepalive_connections=max_connections,
                                                    keepalive_expiry=4.0, http1=True, http2=False)
    return transport


def _upstream(transport: httpx.AsyncBaseTransport) -> Upstream:
    """An Upstream with the settings' defaults, as `proxy.app` builds it."""
    default = {name: field.default for name, field in Settings.model_fields.items()}
    return Upstream(timeout_s=default["llm_timeout_s"], api_key=None, max_tokens=default["llm_max_tokens"],
                    temperature=default["llm_temperature"], failure_threshold=default["circuit_failure_threshold"],
                    reset_s=default["circuit_reset_s"], max_connections=default["upstream_max_connections"],
                    transport=transport)


class _RawCaller:
    """The floor: one kept-alive socket, a pre-built request, the reply read by its content-length."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self._address = (parts.hostname, parts.port)
        body = chat_body(STUB_MODEL)
        self._request = (f"POST {parts.path}/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def __call__(self) -> None:
        if self._stream is None:
            self._stream = await asyncio.open_connection(*self._address)
        reader, writer = self._stream
        writer.write(self._request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        if head[9:12] != b"200":
            raise RuntimeError(head[:12].decode())

    def close(self) -> None:
        if self._stream is not None:
            self._stream[1].close()


async def _run(row: Row, base_url: str, concurrency: int, warmup: float, seconds: float, stagger: float) -> Cell:
    """`concurrency` callers in a closed loop, their first calls spread over `stagger` seconds so they
    do not arrive in lockstep; measured over the `seconds` after the warm-up."""
    upstream = _upstream(row.transport()) if row.transport else None
    plan: list[tuple[Arm, UpstreamTarget]] = [("control", UpstreamTarget(base_url, STUB_MODEL))]
    latencies: list[float] = []
    errors = completed = 0
    now = time.perf_counter()
    start_at, deadline = now + warmup, now + warmup + seconds

    async def caller(offset: float) -> None:
        nonlocal errors, completed
        raw = _RawCaller(base_url) if upstream is None else None
        await asyncio.sleep(offset)
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    await (raw() if raw else upstream.complete(plan, CHAT_MESSAGES))
                except Exception:  # noqa: BLE001 - counted and reported, the run goes on
                    errors += 1
                    continue
                finished = time.perf_counter()
                if start_at <= finished <= deadline:
                    completed += 1  # throughput and CPU: every call that ends in the window
                    if started >= start_at:
                        latencies.append(finished - started)  # latency: calls wholly inside it
        finally:
            if raw:
                raw.close()

    async def cpu_of_window() -> float:
        """CPU seconds per second of the window (a busy loop may wake this late: measure the span)."""
        await asyncio.sleep(start_at - time.perf_counter())
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.sleep(deadline - time.perf_counter())
        return (time.process_time() - cpu) / (time.perf_counter() - wall)

    try:
        cpu_share, *_ = await asyncio.gather(cpu_of_window(), *(caller(stagger * i / concurrency)
                                                                for i in range(concurrency)))
    finally:
        if upstream is not None:
            await upstream.aclose()
    return _cell(latencies, completed, errors, seconds, cpu_share)


def _cell(latencies: list[float], completed: int, errors: int, seconds: float, cpu_share: float) -> Cell:
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000 if latencies else float("nan")

    return Cell(rps=completed / seconds, p50_ms=pct(50), p99_ms=pct(99),
                mean_ms=statistics.fmean(latencies) * 1000 if latencies else float("nan"),
                requests=completed + errors, errors=errors,
                cpu_ms=cpu_share * seconds * 1000 / completed if completed else float("nan"))


def measure(row: Row, base_url: str, concurrency: int, warmup: int, seconds: int, delay_ms: float) -> Cell:
    stagger = min(warmup / 2, delay_ms / 1000)
    return uvloop.run(_run(row, base_url, concurrency, warmup, seconds, stagger))


def report(rows: list[Row], scenario: Scenario, results: dict[tuple[str, str, int], Cell]) -> str:
    def num(value: float, fmt: str) -> str:
        return "—" if value != value else format(value, fmt)

    head = ["Client"]
    for c in scenario.concurrencies:
        head += [f"c={c} req/s", f"c={c} p50 ms", f"c={c} p99 ms", f"c={c} +p50 ms", f"c={c} +p99 ms",
                 f"c={c} CPU ms/call", f"c={c} req/s ÷ hand-written"]
    lines = [f"### {scenario.label}", "",
             "| " + " | ".join(head) + " | errors |", "|---|" + "---:|" * (len(head) - 1) + "---:|"]
    for row in rows:
        cells = [row.label]
        errors = 0
        for c in scenario.concurrencies:
            cell = results[(scenario.key, row.key, c)]
            floor, hand = results.get((scenario.key, "floor", c)), results.get((scenario.key, "http1", c))
            errors += cell.errors
            vs_floor = row.key != "floor" and floor is not None
            cells += [num(cell.rps, ",.0f"), num(cell.p50_ms, ".2f"), num(cell.p99_ms, ".2f"),
                      num(cell.p50_ms - floor.p50_ms, "+.2f") if vs_floor else "—",
                      num(cell.p99_ms - floor.p99_ms, "+.2f") if vs_floor else "—",
                      num(cell.cpu_ms, ".3f"),
                      f"{cell.rps / hand.rps:.2f}×" if hand and hand.rps and row.key != "floor" else "—"]
        lines.append("| " + " | ".join(cells) + f" | {errors} |")
    lines.append("")
    for c in scenario.concurrencies:
        tuned, hand = results.get((scenario.key, "httpx", c)), results.get((scenario.key, "http1", c))
        if tuned and hand and hand.rps:
            lines.append(f"- c={c}, httpx tuned minus hand-written: p50 {num(tuned.p50_ms - hand.p50_ms, '+.2f')} ms, "
                         f"p99 {num(tuned.p99_ms - hand.p99_ms, '+.2f')} ms, CPU per call "
                         f"{num(tuned.cpu_ms - hand.cpu_ms, '+.3f')} ms; requests/s {tuned.rps / hand.rps:.2f}× "
                         "the hand-written client's")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=4, help="seconds measured per cell (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up before each cell (default 1)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds, interleaved; the median is reported (default 1)")
    parser.add_argument("--concurrency", default="1,64",
                        help="concurrent calls against the stub that answers at once (default 1,64)")
    parser.add_argument("--llm-delay-ms", type=float, default=500.0,
                        help="the LLM-like stub's answer time (default 500; 0 leaves that part out)")
    parser.add_argument("--llm-concurrency", default="256",
                        help="concurrent calls against the LLM-like stub (default 256: the pool's size)")
    parser.add_argument("--only", choices=["instant", "llm"], help="run one part: the instant stub or the LLM-like one")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)
    args.concurrencies = _ints(parser, args.concurrency)
    args.llm_concurrencies = _ints(parser, args.llm_concurrency)
    if args.duration < 1 or args.repeat < 1 or args.warmup < 1 or args.llm_delay_ms < 0:
        parser.error("--duration, --warmup and --repeat must be positive, --llm-delay-ms not negative")
    if args.only == "llm" and not args.llm_delay_ms:
        parser.error("--only llm needs --llm-delay-ms above 0")
    return args


def _ints(parser: argparse.ArgumentParser, text: str) -> list[int]:
    values = [int(c) for c in text.split(",") if c.strip()]
    if not values or min(values) < 1:
        parser.error(f"expected comma-separated positive numbers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    size = Settings.model_fields["upstream_max_connections"].default
    rows = [
        Row("floor", "floor (raw socket, no HTTP library)", None),
        Row("httpx", f"httpx tuned ({size} connections, all kept alive)", lambda: _httpx_pool(size, size)),
        Row("httpx_ka50", f"httpx, {size} connections, 50 kept alive", lambda: _httpx_pool(size, 50)),
    ]
    if importlib.util.find_spec("httpcore2") is not None:
        rows.append(Row("httpcore2", f"httpx on httpcore2 {_version('httpcore2')}'s pool ({size}, all kept alive)",
                        lambda: _httpcore2_pool(size)))
    rows.append(Row("http1", "hand-written (proxy/http1.py, as Upstream builds it)",
                    lambda: KeepAliveTransport(max_connections=size)))
    scenarios = [Scenario("instant", "Stub answering at once", 0.0, args.concurrencies)]
    if args.llm_delay_ms:
        scenarios.append(Scenario("llm", f"LLM-like stub: answers after {args.llm_delay_ms:g} ms",
                                  args.llm_delay_ms, args.llm_concurrencies))
    scenarios = [s for s in scenarios if args.only in (None, s.key)]

    tmp = Path(tempfile.mkdtemp(prefix="abloop-bench-"))
    procs = Processes(tmp)
    samples: dict[tuple[str, str, int], list[Cell]] = {}
    try:
        urls = {}
        for scenario in scenarios:
            port = free_port()
            urls[scenario.key] = f"http://127.0.0.1:{port}/v1"
            stub = procs.start(f"stub-{scenario.key}", [PROJECT_PY, "-m", "serving.stub", "--port", str(port),
                                                        "--delay-ms", str(scenario.delay_ms)],
                               env=base_env(), cwd=ROOT)
            wait_http(f"{urls[scenario.key]}/models", stub, procs, f"stub-{scenario.key}", 30)
        cells = len(rows) * sum(len(s.concurrencies) for s in scenarios) * args.repeat
        log(f"{cells} cells × {args.warmup + args.duration} s")
        for round_ in range(args.repeat):
            for scenario in scenarios:
                for c in scenario.concurrencies:
                    for row in rows:
                        cell = measure(row, urls[scenario.key], c, args.warmup, args.duration, scenario.delay_ms)
                        samples.setdefault((scenario.key, row.key, c), []).append(cell)
                        log(f"round {round_ + 1} {scenario.key:<7} c={c:<3} {row.label:<55} {cell.rps:8,.0f} req/s "
                            f"p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  CPU {cell.cpu_ms:6.3f} ms/call  "
                            f"errors {cell.errors}")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    results = {key: Cell.median(cells) for key, cells in samples.items()}
    ours = versions(PROJECT_PY, ["httpx", "httpcore", "httpcore2", "httptools", "uvloop"])
    header = [
        "# Upstream transport",
        "",
        f"- command: `{command}`",
        f"- date: {started.strftime('%Y-%m-%d %H:%M:%S UTC')}; nproc: {os.cpu_count()}; "
        f"load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}",
        f"- host: {platform.platform()}, Python {platform.python_version()}; "
        + ", ".join(f"{k} {v}" for k, v in ours.items()),
        f"- each cell: {args.warmup} s warm-up + {args.duration} s, "
        + (f"median of {args.repeat} interleaved rounds" if args.repeat > 1 else "1 round")
        + "; the stubs (`python -m serving.stub`) in their own processes, the client in this one (uvloop)",
        "- +p50/+p99: the row's latency minus the floor's at the same concurrency, same run. CPU ms/call: "
        "this process's CPU time over the measured window ÷ calls ended in it; \"—\": no call both began and "
        "ended inside the window.",
        "",
    ]
    text = "\n".join(header + [report(rows, scenario, results) + "\n" for scenario in scenarios])
    print(text, flush=True)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())
