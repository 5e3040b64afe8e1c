"""The request span's price in process: CPU per request of one FastAPI route under each way to trace it.

A FastAPI app with the proxy's shape of route (a JSON body in, a JSON answer out, one child span
inside, as the search handler opens several) and the proxy's middleware (RequestContext, tracing or
not) is called through raw ASGI messages, no sockets, so the figure is the app's own work. Each
mode runs in its own process (a process sets its tracer provider once), the modes alternate over
`--rounds`, and the table shows the median CPU per request and what tracing adds to the untraced app:

  off           no tracer provider (tracing off: what the proxy runs by default)
  own           proxy.observability.RequestContext, the proxy's own request span (FastAPI's off)
  fastapi       FastAPI's built-in telemetry (tracing only, no operation spans)
  contrib       opentelemetry-instrumentation-fastapi, as the proxy used it before (skipped when
                the package is not installed: it is no longer a dependency)

Traced modes export through a BatchSpanProcessor to an exporter that drops the spans; `--sampled`
adds each traced mode again with 1 trace in 10 sampled (parent-based ratio sampler).

    python bench/request_span.py --rounds 5 --requests 5000 --sampled
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("off", "own", "fastapi", "contrib")
BODY = b'{"query": "how do I sort a list?", "user_id": "u1"}'


def main() -> None:
    args = _parser().parse_args()
    if args._mode:
        print(json.dumps({"us": _measure(args._mode, args._sampled, args.requests)}))
        return
    modes = [m for m in MODES if m != "contrib" or _contrib_installed()]
    runs = [(m, False) for m in modes] + ([(m, True) for m in modes if m != "off"] if args.sampled else [])
    figures: dict[tuple[str, bool], list[float]] = {run: [] for run in runs}
    for round_ in range(args.rounds):
        for mode, sampled in runs:
            command = [sys.executable, __file__, "--_mode", mode, "--requests", str(args.requests)]
            done = subprocess.run(command + ["--_sampled"] * sampled, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                sys.exit(done.stderr[-3000:])
            figures[(mode, sampled)].append(json.loads(done.stdout.splitlines()[-1])["us"])
            print(f"[bench] round {round_ + 1} {mode}{' 10%' if sampled else ''}: "
                  f"{figures[(mode, sampled)][-1]:.1f} µs", file=sys.stderr, flush=True)  # fmt: skip
    print(_table(figures, args))


def _contrib_installed() -> bool:
    # find_spec imports the parent packages, and a fresh install has no opentelemetry.instrumentation at all
    try:
        return importlib.util.find_spec("opentelemetry.instrumentation.fastapi") is not None
    except ModuleNotFoundError:
        return False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the table shows medians")
    parser.add_argument("--requests", type=int, default=5000, help="measured requests per mode and round")
    parser.add_argument("--sampled", action="store_true", help="also each traced mode with 1 trace in 10 sampled")
    parser.add_argument("--_mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--_sampled", action="store_true", help=argparse.SUPPRESS)
    return parser


def _measure(mode: str, sampled: bool, requests: int) -> float:
    """CPU microseconds per request of `mode`'s app (500 warm-up requests first)."""
    sys.path.insert(0, str(ROOT))
    from fastapi import FastAPI
    from opentelemetry import trace

    if mode != "off":
        trace.set_tracer_provider(_provider(sampled))
    from proxy.observability import FASTAPI_TELEMETRY, RequestContext

    telemetry = {**FASTAPI_TELEMETRY, "tracing": True} if mode == "fastapi" else FASTAPI_TELEMETRY
    app = FastAPI(telemetry={**telemetry, "operation_spans": False})

    from store import tracing

    @app.post("/api/v1/search")
    async def search(body: dict) -> dict:
        with tracing.span("faiss search"):  # as the proxy's handlers open theirs
            return {"answer": "x", **body}

    # Every mode has the proxy's middleware (its error lines, the caller's trace); "own" lets it trace.
    app.add_middleware(RequestContext, traced=mode == "own")
    if mode == "contrib":
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, exclude_spans=["receive", "send"])  # as the proxy had it
    return asyncio.run(_time_requests(app, requests))


def _provider(sampled: bool):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class _Drop(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider(**({"sampler": ParentBased(TraceIdRatioBased(0.1))} if sampled else {}))
    provider.add_span_processor(BatchSpanProcessor(_Drop()))
    return provider


async def _time_requests(app, requests: int) -> float:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/api/v1/search", "raw_path": b"/api/v1/search", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(BODY)).encode())],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip

    async def one() -> None:
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": BODY, "more_body": False}
            await asyncio.Event().wait()  # no disconnect while the request is handled

        async def send(message: dict) -> None:
            return None

        await app(dict(scope, headers=list(scope["headers"]), state={}), receive, send)

    for _ in range(500):
        await one()
    started = time.process_time()
    for _ in range(requests):
        await one()
    return (time.process_time() - started) / requests * 1e6


def _table(figures: dict[tuple[str, bool], list[float]], args: argparse.Namespace) -> str:
    off = statistics.median(figures[("off", False)])
    lines = [
        f"\nCPU per request in process, median of {args.rounds} rounds x {args.requests} requests "
        f"(Python {sys.version.split()[0]})\n",
        "| mode | traces sampled | µs CPU / request | added vs off (µs) | rounds (µs) |",
        "|---|---|---:|---:|---|",
    ]
    for (mode, sampled), values in figures.items():
        median = statistics.median(values)
        added = "—" if mode == "off" else f"{median - off:+.1f}"
        share = "—" if mode == "off" else ("10%" if sampled else "all")
        lines.append(f"| {mode} | {share} | {median:.1f} | {added} | {', '.join(f'{v:.0f}' for v in values)} |")
    lines.append("\ncommand: " + " ".join(shlex.quote(a) for a in ["python", "bench/request_span.py", *sys.argv[1:]]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
