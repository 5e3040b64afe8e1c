"""Proxy overhead: the abloop proxy and the LiteLLM proxy against the same stub upstream.

Measures, side by side in one run, requests/s and p50/p99 latency at concurrency 1 and 64 of

  * the stub upstream called directly (`python -m serving.stub`: answers at once),
  * the abloop proxy with retrieval off (empty INDEX_DIR),
  * the abloop proxy with retrieval on (a pydoc index: sentence-transformers + FAISS),
  * the LiteLLM proxy (one worker) routing one model name to two weighted deployments (9:1),
    both on the same stub,

and prints a markdown table with the latency each proxy adds over the direct call and the ratio
of each row's requests/s to LiteLLM's. The issue's goal: the abloop proxy (retrieval off) serves
>= 5x LiteLLM's requests/s and adds <= 1 ms p50 latency.

`--workers 1,2` runs each abloop proxy once per worker count (`abloop proxy --workers N`), all in
the same run, and adds a table of requests/s, added p50 latency, CPU and memory per worker count,
with each row's requests/s as a ratio of the first count's.

Run from the repository root with the project venv:

    .venv/bin/python bench/proxy_overhead.py [--duration 10] [--skip-litellm] [--skip-retrieval]
                                             [--workers 1,2] [--index-dir DIR] [--repeat N] [--out FILE]

The load generator is wrk (`apt-get install -y wrk`); without it the script falls back to a
built-in asyncio HTTP/1.1 generator, which saturates around a few thousand requests/s on one core
and says so in the report. LiteLLM is installed on first use into its own venv
(.bench-venvs/litellm, `pip install 'litellm[proxy]'`; several minutes, once). All servers are
started as subprocesses on loopback, each in its own process group, and stopped on exit, Ctrl-C
or SIGTERM. Progress goes to stderr; the report goes to stdout (and to --out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store.config import OFFLINE_ENV

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV_BIN = ROOT / ".venv" / "bin"
PROJECT_PY = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
ABLOOP = str(VENV_BIN / "abloop") if (VENV_BIN / "abloop").exists() else (shutil.which("abloop") or "abloop")
LITELLM_VENV_DEFAULT = ROOT / ".bench-venvs" / "litellm"
LITELLM_CONFIG = BENCH / "litellm_config.yaml"
WRK_SEARCH = BENCH / "wrk_search.lua"
WRK_CHAT = BENCH / "wrk_chat.lua"

STUB_MODEL = "stub-model"
LITELLM_MODEL = "abloop-bench"
LITELLM_KEY = "sk-abloop-bench-master"
SPLIT_CHECK = 100  # requests per proxy before the load, to show where the weighted split sends them
GOAL_RPS_RATIO = 5.0
GOAL_ADDED_P50_MS = 1.0

# The contract's variables (and the tuning knobs we set): never inherited from the caller's shell.
ABLOOP_ENV_KEYS = (
    "LLM_API_BASE", "LLM_MODEL", "LLM_API_BASE_NEW_MODEL", "LLM_MODEL_NEW", "LLM_API_KEY",
    "CANDIDATE_SHARE", "DATABASE_URL", "INDEX_DIR", "EMBEDDING_MODEL", "ADMIN_TOKEN", "LLM_TIMEOUT_S",
    "SPOOL_DIR",
)

QUERIES = (
    "How do I write a list comprehension?",
    "What does the with statement do?",
    "How are exceptions raised and caught?",
    "What is the difference between is and ==?",
    "How do generators and yield work?",
    "What are keyword-only arguments?",
    "How does string formatting with f-strings work?",
    "What is a context manager?",
)
CHAT_MESSAGES = [
    {"role": "system", "content": "Answer the question using the passages."},
    {"role": "user", "content": "How do I write a list comprehension?"},
]


def chat_body(model: str) -> bytes:
    return json.dumps({"model": model, "messages": CHAT_MESSAGES, "max_tokens": 256, "temperature": 0.2}).encode()


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Subprocesses


class Processes:
    """Every server this script starts, each in its own session so its whole group can be ended."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.items: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path) -> subprocess.Popen:
        log_file = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()  # the child holds its own descriptor
        self.items.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0) -> None:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(5)
        else:
            _signal_group(proc, signal.SIGKILL)  # leftovers of an exited leader (uvicorn workers)

    def stop_all(self) -> None:
        for _name, proc in reversed(self.items):
            with contextlib.suppress(Exception):  # best effort on the way out
                self.stop(proc)
        self.items.clear()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the group this script created with start_new_session


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 10.0, response_headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response_headers is not None:
                response_headers.update((k.lower(), v) for k, v in response.headers.items())
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_http(url: str, proc: subprocess.Popen, procs: Processes, name: str, timeout: float,
              ok: Callable[[int, bytes], bool] = lambda status, _body: status == 200) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; its log ends:\n{procs.log_tail(name)}")
        try:
            status, body = http("GET", url, timeout=2)
            if ok(status, body):
                return
            last = f"HTTP {status}: {body[:200]!r}"
        except (OSError, urllib.error.URLError) as error:
            last = str(error)
        time.sleep(0.25)
    raise RuntimeError(f"{name} not ready at {url} after {timeout:.0f} s ({last}); its log ends:\n"
                       f"{procs.log_tail(name)}")


# --------------------------------------------------------------------------------------------
# Load generation


@dataclass
class Cell:
    """One target at one concurrency."""

    rps: float  # successful (2xx) responses per second
    p50_ms: float
    p99_ms: float
    mean_ms: float
    requests: int
    errors: int  # non-2xx + socket errors + timeouts
    cpu_ms: float = float("nan")  # CPU time of the server under test per request (all its processes)

    @staticmethod
    def median(cells: list[Cell]) -> Cell:
        if len(cells) == 1:
            return cells[0]
        return Cell(
            rps=statistics.median(c.rps for c in cells),
            p50_ms=statistics.median(c.p50_ms for c in cells),
            p99_ms=statistics.median(c.p99_ms for c in cells),
            mean_ms=statistics.median(c.mean_ms for c in cells),
            requests=sum(c.requests for c in cells),
            errors=sum(c.errors for c in cells),
            cpu_ms=statistics.median(c.cpu_ms for c in cells),
        )


@dataclass
class Target:
    key: str
    label: str
    url: str
    lua: Path
    lua_env: dict[str, str]
    make_body: Callable[[int, int], bytes]  # (worker, n) -> body, for the Python generator
    headers: dict[str, str] = field(default_factory=dict)
    pgid: int | None = None  # the server under test's process group, for its CPU time


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def group_cpu_s(pgid: int | None) -> float:
    """User + system CPU seconds of every live process in a process group (Linux /proc; else NaN)."""
    if pgid is None or not os.path.isdir("/proc"):
        return float("nan")
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields: state ppid pgrp session ... utime(11) stime(12)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / _CLK_TCK


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def group_rss_mb(pgid: int | None) -> float:
    """Resident memory (MB) of every live process in a process group: a server's parent and workers."""
    if pgid is None or not os.path.isdir("/proc"):
        return float("nan")
    pages = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                pgrp = int(f.read().rsplit(b")", 1)[1].split()[2])
            if pgrp == pgid:
                with open(f"/proc/{entry}/statm", "rb") as f:
                    pages += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return pages * _PAGE_BYTES / 1e6


def measure(wrk: str | None, target: Target, concurrency: int, warmup: int, seconds: int) -> Cell:
    """Warm up, then one measured run; adds the server's CPU time per request."""
    if wrk is None:
        # The Python generator runs its warm-up inside the same call, so CPU is counted over both.
        before = group_cpu_s(target.pgid)
        cell = run_python_load(target, concurrency, warmup, seconds)
        requests_total = cell.requests * (warmup + seconds) / seconds
    else:
        if warmup:
            run_wrk(wrk, target, concurrency, warmup)
        before = group_cpu_s(target.pgid)
        cell = run_wrk(wrk, target, concurrency, seconds)
        requests_total = cell.requests
    if requests_total:
        cell.cpu_ms = (group_cpu_s(target.pgid) - before) * 1000 / requests_total
    return cell


def wrk_threads(concurrency: int) -> int:
    return 1 if concurrency == 1 else 2


def run_wrk(wrk: str, target: Target, concurrency: int, seconds: int) -> Cell:
    argv = [wrk, f"-t{wrk_threads(concurrency)}", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s",
            "--latency", "-s", str(target.lua), target.url]
    env = dict(os.environ, **target.lua_env)
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stdout[-2000:]} {result.stderr[-2000:]}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    errors = sum(data[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
    ok = max(0, data["requests"] - data["err_status"])
    nan = float("nan")
    return Cell(  # no completed request: no latency (wrk would say 0)
        rps=ok / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000 if data["requests"] else nan,
        p99_ms=data["p99_us"] / 1000 if data["requests"] else nan,
        mean_ms=data["mean_us"] / 1000 if data["requests"] else nan,
        requests=data["requests"],
        errors=errors,
    )


async def _py_worker(host: str, port: int, head: bytes, target: Target, worker: int, start_at: float,
                     deadline: float, latencies: list[float], counts: dict[str, int]) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        counts["errors"] += 1
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    n = 0
    try:
        while time.perf_counter() < deadline:
            body = target.make_body(worker, n)
            n += 1
            started = time.perf_counter()
            writer.write(head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            header = await reader.readuntil(b"\r\n\r\n")
            status = int(header[9:12])
            length, chunked = 0, False
            for raw in header.split(b"\r\n")[1:]:
                name, _, value = raw.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            elif length:
                await reader.readexactly(length)
            finished = time.perf_counter()
            if started >= start_at and finished <= deadline:
                if 200 <= status < 300:
                    latencies.append(finished - started)
                else:
                    counts["errors"] += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        counts["errors"] += 1
    finally:
        writer.close()


def run_python_load(target: Target, concurrency: int, warmup: int, seconds: int) -> Cell:
    from urllib.parse import urlsplit

    parts = urlsplit(target.url)
    extra = "".join(f"{k}: {v}\r\n" for k, v in target.headers.items())
    head = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"{extra}").encode()

    async def _all() -> tuple[list[float], dict[str, int], float]:
        latencies: list[float] = []
        counts = {"errors": 0}
        now = time.perf_counter()
        start_at, deadline = now + warmup, now + warmup + seconds
        await asyncio.gather(*(
            _py_worker(parts.hostname, parts.port, head, target, w, start_at, deadline, latencies, counts)
            for w in range(concurrency)
        ))
        return latencies, counts, seconds

    try:
        import uvloop

        latencies, counts, elapsed = uvloop.run(_all())
    except ImportError:
        latencies, counts, elapsed = asyncio.run(_all())
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

    return Cell(rps=len(latencies) / elapsed, p50_ms=pct(50), p99_ms=pct(99),
                mean_ms=(statistics.fmean(latencies) * 1000) if latencies else float("nan"),
                requests=len(latencies) + counts["errors"], errors=counts["errors"])


# --------------------------------------------------------------------------------------------
# Setup


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ABLOOP_ENV_KEYS}
    env.update(OFFLINE_ENV)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def ensure_litellm(venv: Path) -> Path:
    """The LiteLLM CLI in its own venv; created with `pip install 'litellm[proxy]'` if missing."""
    cli = venv / "bin" / "litellm"
    if cli.exists():
        return cli
    log(f"LiteLLM not found: installing 'litellm[proxy]' into {venv} (one-time, several minutes)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    install_log = venv.parent / "litellm-install.log"
    with open(install_log, "ab") as out:
        result = subprocess.run([str(venv / "bin" / "pip"), "install", "--disable-pip-version-check",
                                 "litellm[proxy]"], stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0 or not cli.exists():
        raise RuntimeError(f"pip install 'litellm[proxy]' failed; see {install_log}")
    return cli


def versions(python: str, names: list[str]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = 'not installed'\n"
            "print(json.dumps(out))")
    try:
        result = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, timeout=60)
        return json.loads(result.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {n: "?" for n in names}


def has_index(index_dir: Path) -> bool:
    current = index_dir / "CURRENT"
    return current.is_file() and bool(current.read_text().strip())


def start_index_build(procs: Processes, index_dir: Path, tmp: Path) -> subprocess.Popen:
    index_dir.mkdir(parents=True, exist_ok=True)
    env = base_env()
    env.update(INDEX_DIR=str(index_dir), DATABASE_URL=f"sqlite:///{tmp / 'index-build.db'}")
    log(f"building the pydoc index into {index_dir} (`abloop index build --corpus pydoc`)")
    return procs.start("index-build", [ABLOOP, "index", "build", "--corpus", "pydoc"], env=env, cwd=tmp)


def measure_rounds(wrk: str | None, targets: list[Target], concurrencies: list[int], rounds: int, warmup: int,
                   duration: int, *, pause_others: bool = False) -> dict[tuple[str, int], list[Cell]]:
    """Every target at every concurrency, back to back (interleaved), `rounds` times: the cells by (key, c).

    `pause_others`: the targets not being measured are stopped (SIGSTOP) meanwhile, so that their idle work
    (an idle proxy's timers take ~3% of a core) does not share the measured one's CPU.
    """
    samples: dict[tuple[str, int], list[Cell]] = {}
    cells = len(targets) * len(concurrencies) * rounds
    log(f"measuring {cells} cells × ({warmup} s warm-up + {duration} s) with "
        f"{'wrk' if wrk else 'the asyncio generator'}: ~{cells * (warmup + duration) / 60:.1f} min")
    for round_ in range(rounds):
        for c in concurrencies:
            for target in targets:
                with _paused([other.pgid for other in targets if other is not target] if pause_others else []):
                    cell = measure(wrk, target, c, warmup, duration)
                samples.setdefault((target.key, c), []).append(cell)
                log(f"round {round_ + 1} c={c:<3} {target.label:<45} {cell.rps:9,.0f} req/s  "
                    f"p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  "
                    f"server CPU {cell.cpu_ms:5.3f} ms/req  errors {cell.errors}")
    return samples


@contextlib.contextmanager
def _paused(pgids: list[int]) -> Iterator[None]:
    for pgid in pgids:
        os.killpg(pgid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pgid in pgids:
            os.killpg(pgid, signal.SIGCONT)


def start_stub(procs: Processes) -> tuple[str, subprocess.Popen]:
    """The stub upstream (`python -m serving.stub`: answers at once) in a process of its own: its base URL, it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    stub = procs.start("stub", [PROJECT_PY, "-m", "serving.stub", "--port", str(port)], env=base_env(), cwd=ROOT)
    wait_http(f"{base}/models", stub, procs, "stub", 30)
    return base, stub


def start_abloop(procs: Processes, name: str, port: int, stub_base: str, index_dir: Path, tmp: Path,
                 extra_env: list[str], workers: int = 1, cpus: str | None = None) -> subprocess.Popen:
    """`abloop proxy` on the stub; `cpus` (taskset's list, e.g. "1") pins it and its workers to those CPUs."""
    work = tmp / name
    work.mkdir(parents=True, exist_ok=True)
    (work / "spool").mkdir(exist_ok=True)
    index_dir.mkdir(parents=True, exist_ok=True)
    env = base_env()
    env.update(
        LLM_API_BASE=stub_base,
        LLM_MODEL=STUB_MODEL,
        # A candidate arm on the same stub with a 10% share, like LiteLLM's 9:1 deployments.
        LLM_API_BASE_NEW_MODEL=stub_base,
        LLM_MODEL_NEW="stub-candidate",
        CANDIDATE_SHARE="0.1",
        DATABASE_URL=f"sqlite:///{work / 'abloop.db'}",
        SPOOL_DIR=str(work / "spool"),
        INDEX_DIR=str(index_dir),
    )
    env.update(entry.split("=", 1) for entry in extra_env)
    # cwd is the temp dir so that no .env of the repository leaks in (ADMIN_TOKEN stays unset).
    pin = ["taskset", "-c", cpus] if cpus else []  # taskset execs the command: the pid is the proxy's
    return procs.start(name, [*pin, ABLOOP, "proxy", "--host", "127.0.0.1", "--port", str(port),
                              "--workers", str(workers), "--log-level", "warning"], env=env, cwd=work)


def serving_workers(workers: int) -> Callable[[int, bytes], bool]:
    """A /metrics answer that counts `workers` workers serving (each publishes `abloop_workers` once started)."""
    def _ok(status: int, body: bytes) -> bool:
        found = re.search(rb"^abloop_workers (\S+)$", body, re.MULTILINE)
        return status == 200 and found is not None and float(found.group(1)) == workers
    return _ok


def abloop_key(retrieval: str, workers: int) -> str:
    """`abloop_off` / `abloop_on` for one worker (the rows the goals read), `abloop_off_w2` for two, …"""
    return f"abloop_{retrieval}" + ("" if workers == 1 else f"_w{workers}")


def start_litellm(procs: Processes, cli: Path, port: int, stub_base: str, tmp: Path) -> subprocess.Popen:
    work = tmp / "litellm"
    work.mkdir(parents=True, exist_ok=True)
    env = base_env()
    env.pop("PYTHONPATH", None)
    for key in ("DATABASE_URL", "REDIS_HOST", "REDIS_URL", "STORE_MODEL_IN_DB"):
        env.pop(key, None)  # no database, no cache: LiteLLM as a pure router
    env.update(
        LITELLM_MASTER_KEY=LITELLM_KEY,
        ABLOOP_BENCH_STUB_BASE=stub_base,
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # do not fetch the cost map from the network
        LITELLM_LOG="ERROR",
        LITELLM_TELEMETRY="False",
        DISABLE_ADMIN_UI="True",
        LITELLM_DONT_SHOW_FEEDBACK_BOX="True",
    )
    return procs.start("litellm", [str(cli), "--config", str(LITELLM_CONFIG), "--host", "127.0.0.1",
                                   "--port", str(port), "--num_workers", "1"], env=env, cwd=work)


def check(target: Target, validate: Callable[[dict[str, Any]], str | None],
          split: Callable[[dict[str, Any], dict[str, str]], str] | None = None, n: int = 1) -> dict[str, int]:
    """Requests before the load: a proxy that answers errors fast must not win the benchmark.

    With `split`, sends `n` requests (different user ids) and counts where each went (arm or
    deployment), to show that the weighted split is really exercised.
    """
    seen: dict[str, int] = {}
    for i in range(n):
        body = target.make_body(i, i)
        headers: dict[str, str] = {}
        status, raw = http("POST", target.url, body, {"Content-Type": "application/json", **target.headers},
                           timeout=60, response_headers=headers)
        if status != 200:
            raise RuntimeError(f"{target.label}: HTTP {status}: {raw[:500]!r}")
        payload = json.loads(raw)
        problem = validate(payload)
        if problem:
            raise RuntimeError(f"{target.label}: {problem}: {raw[:500]!r}")
        if split is not None:
            where = split(payload, headers)
            seen[where] = seen.get(where, 0) + 1
    return seen


# --------------------------------------------------------------------------------------------
# Report


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"  # noqa: PLR0124 - NaN check


def fmt_added(value: float) -> str:
    return "n/a" if value != value else f"{value:+.2f}"


def report(args: argparse.Namespace, header: list[str], targets: list[Target], concurrencies: list[int],
           results: dict[tuple[str, int], Cell]) -> str:
    lines = list(header)
    lines.append("")
    columns = ["Target"]
    for c in concurrencies:
        columns += [f"c={c} req/s", f"c={c} p50 ms", f"c={c} p99 ms", f"c={c} +p50 ms", f"c={c} +p99 ms",
                    f"c={c} req/s ÷ LiteLLM"]
    columns.append("errors")
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|")
    for target in targets:
        row = [target.label]
        errors = 0
        for c in concurrencies:
            cell = results[(target.key, c)]
            direct = results.get(("direct", c))
            litellm = results.get(("litellm", c))
            errors += cell.errors
            if target.key == "direct":
                added50 = added99 = "—"
            else:
                added50 = fmt_added(cell.p50_ms - direct.p50_ms) if direct else "n/a"
                added99 = fmt_added(cell.p99_ms - direct.p99_ms) if direct else "n/a"
            ratio = f"{cell.rps / litellm.rps:.1f}×" if litellm and litellm.rps > 0 else "n/a"
            row += [f"{cell.rps:,.0f}", fmt(cell.p50_ms), fmt(cell.p99_ms), added50, added99, ratio]
        row.append(str(errors))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("+p50/+p99: latency added over the direct call at the same concurrency (proxy minus direct, "
                 "both measured in this run). req/s counts 2xx responses only.")
    lines.append("")
    lines.append("Server CPU per request (user+system CPU of the server under test's processes ÷ requests; the stub "
                 "for the direct row, the proxy alone for the others). Less sensitive than req/s to other load on "
                 "the box; 1000 ÷ it ≈ the req/s one free core would give.")
    lines.append("")
    lines.append("| Target | " + " | ".join(f"c={c} CPU ms/req" for c in concurrencies) + " | "
                 + " | ".join(f"c={c} ≈ req/s per core" for c in concurrencies) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (2 * len(concurrencies))) + "|")
    for target in targets:
        cpu = [results[(target.key, c)].cpu_ms for c in concurrencies]
        lines.append("| " + " | ".join([target.label] + [fmt(v, 3) for v in cpu]
                                       + [("n/a" if v != v or v <= 0 else f"{1000 / v:,.0f}") for v in cpu]) + " |")

    lines.append("")
    lines.append(f"Goals (abloop proxy, retrieval off, vs LiteLLM, same run): >= {GOAL_RPS_RATIO:g}× LiteLLM's "
                 f"requests/s and <= {GOAL_ADDED_P50_MS:g} ms added p50 latency.")
    if ("abloop_off", concurrencies[0]) not in results:
        lines.append("- not evaluated")
        return "\n".join(lines)
    for c in concurrencies:
        cell = results[("abloop_off", c)]
        parts = []
        litellm = results.get(("litellm", c))
        if litellm and litellm.rps > 0:
            ratio = cell.rps / litellm.rps
            parts.append(f"requests/s {cell.rps:,.0f} = {ratio:.1f}× LiteLLM's {litellm.rps:,.0f} → "
                         f"{'MET' if ratio >= GOAL_RPS_RATIO else 'NOT MET'}")
        elif litellm:
            parts.append("requests/s ratio: n/a (LiteLLM completed no request)")
        else:
            parts.append("requests/s ratio: LiteLLM skipped")
        direct = results.get(("direct", c))
        if direct and cell.p50_ms == cell.p50_ms:
            added = cell.p50_ms - direct.p50_ms
            verdict = "MET" if added <= GOAL_ADDED_P50_MS else "NOT MET"
            if c > 1:
                verdict += " (at this concurrency the proxy is saturated: mostly queueing, not per-request cost)"
            parts.append(f"added p50 {added:+.2f} ms → {verdict}")
        if litellm and cell.cpu_ms > 0 and litellm.cpu_ms == litellm.cpu_ms:
            parts.append(f"CPU per request: LiteLLM's is {litellm.cpu_ms / cell.cpu_ms:.1f}× abloop's")
        lines.append(f"- c={c}: " + "; ".join(parts))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def workers_report(workers: list[int], concurrencies: list[int], results: dict[tuple[str, int], Cell],
                   rss: dict[str, float]) -> str:
    """1 vs N workers, retrieval off and on: requests/s (and its ratio to the first worker count), latency
    added over the direct call, server CPU per request and the server's resident memory (all its processes)."""
    base = workers[0]
    columns = ["Retrieval", "workers"]
    for c in concurrencies:
        columns += [f"c={c} req/s", f"c={c} ÷ {base} worker{'s' if base > 1 else ''}", f"c={c} +p50 ms",
                    f"c={c} CPU ms/req"]
    columns.append("RSS MB")
    lines = [f"## Workers: 1 proxy process vs several (`abloop proxy --workers N`), {os.cpu_count()} cores", "",
             "| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    for retrieval in ("off", "on"):
        for count in workers:
            key = abloop_key(retrieval, count)
            if (key, concurrencies[0]) not in results:
                continue
            row = [retrieval, str(count)]
            for c in concurrencies:
                cell, first = results[(key, c)], results.get((abloop_key(retrieval, base), c))
                direct = results.get(("direct", c))
                ratio = f"{cell.rps / first.rps:.2f}×" if first and first.rps > 0 else "n/a"
                row += [f"{cell.rps:,.0f}", ratio, fmt_added(cell.p50_ms - direct.p50_ms) if direct else "n/a",
                        fmt(cell.cpu_ms, 3)]
            row.append(fmt(rss.get(key, float("nan")), 0))
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Every worker holds its own embedder and index (RSS); the load generator, the stub and every "
              "server share the same cores, so N workers cannot give N× here unless cores are left idle by one."]
    return "\n".join(lines)


def add_load_arguments(parser: argparse.ArgumentParser, *, duration: int, warmup: int) -> None:
    """The options of every benchmark that loads proxies through `measure`: cells, load generator, output."""
    parser.add_argument("--duration", type=int, default=duration,
                        help=f"seconds measured per cell (default {duration})")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help=f"seconds of warm-up load before each cell (default {warmup})")
    parser.add_argument("--concurrency", default="1,64", help="comma-separated connection counts (default 1,64)")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto",
                        help="auto: wrk if installed, else bench/proxy_overhead.py's asyncio generator")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp dir (server logs, databases)")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) to this file")


def parse_concurrencies(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c.strip()]


def choose_wrk(loadgen: str) -> str | None:
    """wrk's path, or None for the asyncio generator; exits (2) when `--loadgen wrk` asked for a missing wrk."""
    wrk = shutil.which("wrk") if loadgen in ("auto", "wrk") else None
    if loadgen == "wrk" and wrk is None:
        log("wrk not found: install it with `apt-get install -y wrk` (Debian/Ubuntu) or `brew install wrk`")
        sys.exit(2)
    if wrk is None:
        log("wrk not found (install: `apt-get install -y wrk`); using the built-in asyncio HTTP/1.1 generator, "
            "which may itself be the bottleneck above a few thousand requests/s")
    return wrk


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP end the run as Ctrl-C does: through `finally`, which stops every server started."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser, duration=10, warmup=2)
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure every cell N times, interleaved, and report the median (default 1)")
    parser.add_argument("--skip-litellm", action="store_true", help="leave the LiteLLM proxy out")
    parser.add_argument("--skip-retrieval", action="store_true", help="leave the retrieval-on row out")
    parser.add_argument("--workers", default="1",
                        help="comma-separated worker counts, one abloop proxy each (default 1; e.g. 1,2)")
    parser.add_argument("--index-dir", type=Path,
                        help="a cached index dir for retrieval on (built there with the pydoc corpus if it has "
                             "none); default: built once into a temp dir")
    parser.add_argument("--litellm-venv", type=Path, default=LITELLM_VENV_DEFAULT,
                        help=f"venv holding litellm[proxy] (default {LITELLM_VENV_DEFAULT.relative_to(ROOT)})")
    parser.add_argument("--proxy-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the abloop proxies, e.g. OMP_NUM_THREADS=1 (repeatable)")
    args = parser.parse_args(argv)
    args.concurrencies = parse_concurrencies(args.concurrency)
    args.workers = list(dict.fromkeys(int(w) for w in args.workers.split(",") if w.strip()))
    if (not args.concurrencies or min(args.concurrencies) < 1 or not args.workers or min(args.workers) < 1
            or args.duration < 1 or args.repeat < 1):
        parser.error("--concurrency, --workers, --duration and --repeat must be positive")
    if any("=" not in e for e in args.proxy_env):
        parser.error("--proxy-env expects KEY=VALUE")
    return args


def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    wrk = choose_wrk(args.loadgen)

    litellm_cli = None if args.skip_litellm else ensure_litellm(args.litellm_venv)

    tmp = Path(tempfile.mkdtemp(prefix="abloop-bench-"))
    (tmp / "logs").mkdir()
    procs = Processes(tmp / "logs")
    try:
        # The stub upstream.
        stub_base, stub = start_stub(procs)
        log(f"stub upstream at {stub_base}")

        # Slow starters first, in the background: the index build and LiteLLM.
        build = None
        index_dir = None
        if not args.skip_retrieval:
            index_dir = args.index_dir.resolve() if args.index_dir else tmp / "index-on"
            if has_index(index_dir):
                log(f"reusing the index in {index_dir}")
            else:
                build = start_index_build(procs, index_dir, tmp)
        litellm = litellm_port = None
        if litellm_cli is not None:
            litellm_port = free_port()
            litellm = start_litellm(procs, litellm_cli, litellm_port, stub_base, tmp)

        # One abloop proxy per (retrieval, worker count), all running for the whole run.
        abloops: dict[str, tuple[int, subprocess.Popen]] = {}

        def start_proxy(retrieval: str, workers: int, index: Path) -> None:
            key, port = abloop_key(retrieval, workers), free_port()
            name = key.replace("_", "-")
            proc = start_abloop(procs, name, port, stub_base, index, tmp, args.proxy_env, workers)
            if retrieval == "on":
                wait_http(f"http://127.0.0.1:{port}/readyz", proc, procs, name, 300,
                          ok=lambda status, body: status == 200 and json.loads(body).get("ready") is True)
            wait_http(f"http://127.0.0.1:{port}/metrics", proc, procs, name, 300, ok=serving_workers(workers))
            abloops[key] = (port, proc)
            log(f"abloop proxy (retrieval {retrieval}, {workers} worker(s)) on :{port}")

        for workers in args.workers:
            start_proxy("off", workers, tmp / "index-off")

        if index_dir is not None:
            if build is not None:
                t0 = time.monotonic()
                while build.poll() is None:
                    time.sleep(1)
                if build.returncode != 0:
                    raise RuntimeError(f"index build failed ({build.returncode}):\n{procs.log_tail('index-build')}")
                log(f"index built in {time.monotonic() - t0:.0f} s (waited): {procs.log_tail('index-build', 1)}")
            for workers in args.workers:
                start_proxy("on", workers, index_dir)

        if litellm is not None:
            wait_http(f"http://127.0.0.1:{litellm_port}/health/liveliness", litellm, procs, "litellm", 300)
            log(f"LiteLLM proxy on :{litellm_port}")

        def search_body(worker: int, n: int) -> bytes:
            return json.dumps({"query": QUERIES[n % len(QUERIES)], "user_id": f"u{worker}-{n % 5000}"}).encode()

        direct_body = chat_body(STUB_MODEL)
        litellm_body = chat_body(LITELLM_MODEL)
        targets = [Target("direct", "direct stub", f"{stub_base}/chat/completions", WRK_CHAT,
                          {"BENCH_BODY": direct_body.decode()}, lambda _w, _n: direct_body, pgid=stub.pid)]
        for retrieval in ("off", "on"):
            for workers in args.workers:
                if abloop_key(retrieval, workers) not in abloops:
                    continue
                port, proc = abloops[abloop_key(retrieval, workers)]
                label = f"abloop proxy, retrieval {retrieval}" + (
                    f", {workers} worker{'s' if workers > 1 else ''}" if len(args.workers) > 1 else "")
                targets.append(Target(abloop_key(retrieval, workers), label,
                                      f"http://127.0.0.1:{port}/api/v1/search", WRK_SEARCH, {}, search_body,
                                      pgid=proc.pid))
        if litellm_port is not None:
            targets.append(Target("litellm", "LiteLLM proxy (2 weighted deployments)",
                                  f"http://127.0.0.1:{litellm_port}/v1/chat/completions", WRK_CHAT,
                                  {"BENCH_BODY": litellm_body.decode(), "BENCH_AUTH": LITELLM_KEY},
                                  lambda _w, _n: litellm_body, {"Authorization": f"Bearer {LITELLM_KEY}"},
                                  pgid=litellm.pid))

        def chat_ok(payload: dict[str, Any]) -> str | None:
            return None if payload.get("choices") else "no choices in the answer"

        def search_ok(want_items: bool) -> Callable[[dict[str, Any]], str | None]:
            def _ok(payload: dict[str, Any]) -> str | None:
                if not payload.get("answer") or payload.get("served_arm") not in ("control", "candidate"):
                    return "no answer from the upstream"
                if want_items and not payload.get("items"):
                    return "retrieval on but no items"
                return None
            return _ok

        splits: dict[str, dict[str, int]] = {}
        for target in targets:
            if target.key.startswith("abloop"):
                splits[target.key] = check(target, search_ok(target.key.startswith("abloop_on")),
                                           lambda payload, _h: str(payload.get("arm")),
                                           # the same routing code twice; embedding makes "on" slow
                                           n=SPLIT_CHECK if target.key.startswith("abloop_off") else 5)
            elif target.key == "litellm":
                splits[target.key] = check(target, chat_ok,
                                           lambda _p, headers: headers.get("x-litellm-model-id", "?"), n=SPLIT_CHECK)
            else:
                check(target, chat_ok)

        samples = measure_rounds(wrk, targets, args.concurrencies, args.repeat, args.warmup, args.duration)
        results = {key: Cell.median(value) for key, value in samples.items()}
        rss = {target.key: group_rss_mb(target.pgid) for target in targets if target.key.startswith("abloop")}
    finally:
        procs.stop_all()
        if args.keep_temp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    ours = versions(PROJECT_PY, ["fastapi", "starlette", "uvicorn", "uvloop", "httptools", "httpx", "pydantic"])
    theirs = (versions(str(args.litellm_venv / "bin" / "python"), ["litellm", "fastapi", "uvicorn"])
              if litellm_cli else {})
    if wrk:
        wrk_version = subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.splitlines()[0].split(" [")[0]
        loadgen = (f"{wrk_version}: `-t1 -c1`, `-t2 -c64` (`-t2` for every concurrency > 1), "
                   f"{args.warmup} s warm-up + {args.duration} s per cell")
    else:
        loadgen = (f"built-in asyncio HTTP/1.1 generator (wrk not installed: `apt-get install -y wrk`); "
                   f"{args.warmup} s warm-up + {args.duration} s per cell; it may cap the direct row")
    header = [
        "# abloop proxy overhead",
        "",
        f"- command: `{command}`",
        f"- date: {started.strftime('%Y-%m-%d %H:%M:%S UTC')}; nproc: {os.cpu_count()}; "
        f"load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}",
        f"- host: {platform.platform()}, Python {platform.python_version()}",
        "- abloop: " + ", ".join(f"{k} {v}" for k, v in ours.items())
        + f"; uvicorn workers per proxy: {', '.join(map(str, args.workers))}; "
        "2 arms (candidate share 0.1) on the stub",
        ("- LiteLLM: " + f"litellm {theirs.get('litellm')} (its fastapi {theirs.get('fastapi')}, uvicorn "
         f"{theirs.get('uvicorn')}); 1 worker; one model name, 2 deployments weighted 9:1 on the stub")
        if theirs else "- LiteLLM: skipped",
        f"- load: {loadgen}; " + (f"median of {args.repeat} interleaved rounds" if args.repeat > 1 else "1 round"),
        "- abloop rows: `POST /api/v1/search` (varying queries and user ids); direct and LiteLLM rows: "
        "`POST /v1/chat/completions` with a small chat body",
    ]
    for key, seen in splits.items():
        label = next(t.label for t in targets if t.key == key)
        header.append(f"- split check, {label}: {sum(seen.values())} requests → "
                      + ", ".join(f"{k} {v}" for k, v in sorted(seen.items())))
    if args.proxy_env:
        header.append("- extra env for the abloop proxies: " + " ".join(f"`{e}`" for e in args.proxy_env))
    text = report(args, header, targets, args.concurrencies, results)
    if len(args.workers) > 1:
        text += "\n\n" + workers_report(args.workers, args.concurrencies, results, rss)
    print(text, flush=True)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; servers stopped")
        sys.exit(130)
