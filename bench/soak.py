"""Soak under faults: two proxy replicas on PostgreSQL, a control and a candidate upstream, and a schedule
of failures while N searches (each followed by a feedback POST) go through; then count what was stored.

Goal (issue 11): 0 lost events (every 200 search's request_id is a row in search_events), 0 duplicated
ids, no 5xx (both arms are never down here, so the documented 502/504 never apply), and feedback on every
event accepted (201) and stored. Prints a markdown table and exits 1 if a goal is missed.

    .venv/bin/python bench/soak.py [--requests 50000] [--concurrency 200] [--outage-s 30] [--slow-s 20]
                                   [--out FILE] [--keep-schema]

What runs (all on loopback, each server its own subprocess and process group, stopped on exit):
  * two `python -m serving.stub` upstreams, control and candidate (CANDIDATE_SHARE=0.5);
  * a TCP gate in front of PostgreSQL (`TcpGate` from tests/proxy/test_durability.py, in a child
    process of this script so its pump threads do not share the load generator's GIL);
  * two `abloop proxy` replicas, each with its own SPOOL_DIR, one DATABASE_URL through the gate into a
    fresh schema (`?options=-csearch_path%3D<schema>`), RATE_LIMIT_PER_MINUTE=0, ADMIN_TOKEN set, an
    empty INDEX_DIR (retrieval off: the soak is about the log path, not the embedder).

The load alternates replicas; each search has its own user id and its feedback goes to the *other*
replica. A connection refused or cut (a replica restarting) is retried on the other replica, as a load
balancer would; a 503 on feedback is retried after its Retry-After (backing off to 10 s), in a task of its own so the
searches go on meanwhile. First answers are counted too.

The fault schedule (seconds from the start of the load), one after another:
  baseline 5 s → candidate killed (SIGKILL) for 5 s, restarted → normal 5 s → candidate slow (restarted
  with `--delay-ms 2000`) for --slow-s, restarted at full speed → normal 5 s → PostgreSQL unreachable
  (the gate refuses and cuts connections; the shared server itself is never stopped) for --outage-s →
  normal 5 s → one replica SIGTERMed and started again on the same port and spool dir → normal.
If the N requests finish before the schedule does, the run says so and fails: raise --requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from proxy_overhead import ABLOOP, PROJECT_PY, ROOT, Processes, base_env, free_port, log, wait_http
from sqlalchemy import create_engine, text

from store.db import normalize_url

POSTGRES = os.environ.get("ABLOOP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
ADMIN_TOKEN = "soak-admin-token"
SLOW_DELAY_MS = 2000
BASELINE_S = 5.0
KILL_S = 5.0
GAP_S = 5.0
QUERIES = ("What does the with statement do?", "How do generators work?", "What is a context manager?",
           "How are exceptions raised and caught?")


# --------------------------------------------------------------------------------------------
# The PostgreSQL gate, in its own process: reads "close" / "open" lines on stdin, prints its port.


def _gate_main() -> None:
    from tests.proxy.test_durability import TcpGate  # the test's gate: one implementation of the outage

    host, _, port = POSTGRES.split("@", 1)[1].split("/", 1)[0].partition(":")
    gate = TcpGate((host, int(port or 5432)))
    gate.open()
    print(gate.port, flush=True)
    for line in sys.stdin:
        {"close": gate.close, "open": gate.open}[line.strip()]()
        print("ok", flush=True)
    gate.close()


class Gate:
    def __init__(self, procs: Processes) -> None:
        self.proc = subprocess.Popen([PROJECT_PY, __file__, "--gate"], env=base_env(), cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        procs.items.append(("gate", self.proc))
        self.port = int(self.proc.stdout.readline())

    def _command(self, word: str) -> None:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline().strip() != "ok":
            raise RuntimeError(f"the PostgreSQL gate did not {word}")

    async def close(self) -> None:
        await asyncio.to_thread(self._command, "close")

    async def open(self) -> None:
        await asyncio.to_thread(self._command, "open")


# --------------------------------------------------------------------------------------------
# The servers


@dataclass
class Cluster:
    procs: Processes
    work: Path
    database_url: str
    control_port: int = field(default_factory=free_port)
    candidate_port: int = field(default_factory=free_port)
    replica_ports: list[int] = field(default_factory=lambda: [free_port(), free_port()])
    servers: dict[str, subprocess.Popen] = field(default_factory=dict)
    starts: Counter = field(default_factory=Counter)

    def start_stub(self, arm: str, delay_ms: int = 0) -> None:
        port = self.control_port if arm == "control" else self.candidate_port
        name = self._log_name(arm)
        proc = self.procs.start(name, [PROJECT_PY, "-m", "serving.stub", "--port", str(port),
                                       "--delay-ms", str(delay_ms)], env=base_env(), cwd=ROOT)
        self.servers[arm] = proc
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, self.procs, name, 30)

    def start_replica(self, index: int) -> None:
        name, port = f"replica{index}", self.replica_ports[index]
        work = self.work / name
        (work / "spool").mkdir(parents=True, exist_ok=True)
        (self.work / "index").mkdir(exist_ok=True)
        env = base_env()
        env.update(
            LLM_API_BASE=f"http://127.0.0.1:{self.control_port}/v1", LLM_MODEL="control-model",
            LLM_API_BASE_NEW_MODEL=f"http://127.0.0.1:{self.candidate_port}/v1", LLM_MODEL_NEW="candidate-model",
            CANDIDATE_SHARE="0.5", DATABASE_URL=self.database_url, SPOOL_DIR=str(work / "spool"),
            INDEX_DIR=str(self.work / "index"), ADMIN_TOKEN=ADMIN_TOKEN, RATE_LIMIT_PER_MINUTE="0",
            LLM_TIMEOUT_S="10",
            # The breaker the kill opens probes again after 5 s (default 30), so the slow window that
            # follows reaches the candidate instead of short-circuiting to control.
            CIRCUIT_RESET_S="5",
        )
        log_name = self._log_name(name)
        # cwd is the replica's own directory so that no .env of the repository leaks in.
        proc = self.procs.start(log_name, [ABLOOP, "proxy", "--host", "127.0.0.1", "--port", str(port),
                                           "--workers", "1", "--log-level", "warning"], env=env, cwd=work)
        self.servers[name] = proc
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, self.procs, log_name, 180)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.servers.pop(name)
        if sig == signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        else:
            self.procs.stop(proc, timeout=60)

    def _log_name(self, name: str) -> str:
        self.starts[name] += 1
        return f"{name}-{self.starts[name]}"

    def spool_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.work.glob("replica*/spool/**/*") if p.is_file())

    def rejected_files(self) -> list[Path]:
        return [p for p in self.work.glob("replica*/spool/rejected/**/*") if p.is_file()]


# --------------------------------------------------------------------------------------------
# The load


@dataclass
class Window:
    """What happened to requests that started while one fault (or none) was on."""

    search_ms: list[float] = field(default_factory=list)
    feedback_ms: list[float] = field(default_factory=list)
    fallbacks: int = 0
    candidate_served: int = 0


@dataclass
class Load:
    windows: dict[str, Window] = field(default_factory=lambda: defaultdict(Window))
    window: str = "baseline"
    search_codes: Counter = field(default_factory=Counter)
    feedback_codes: Counter = field(default_factory=Counter)  # final answers
    feedback_first: Counter = field(default_factory=Counter)  # first answers, before any retry
    transport_errors: Counter = field(default_factory=Counter)
    event_ids: list[str] = field(default_factory=list)
    feedback_ok: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sent: int = 0
    done: int = 0
    t0: float = field(default_factory=time.perf_counter)


async def _post(client: httpx.AsyncClient, urls: list[str], first: int, path: str, body: dict,
                load: Load) -> tuple[httpx.Response | None, float]:
    """POST, moving to the other replica when the connection is refused or cut (a replica restarting)."""
    started = time.perf_counter()
    for attempt in range(8):
        url = urls[(first + attempt) % len(urls)]
        try:
            response = await client.post(url + path, json=body)
            return response, (time.perf_counter() - started) * 1000
        except httpx.TransportError as error:
            load.transport_errors[f"{path} {type(error).__name__}"] += 1
            await asyncio.sleep(0.05 * attempt)
    return None, (time.perf_counter() - started) * 1000


async def _search(client: httpx.AsyncClient, urls: list[str], n: int, run: str,
                  load: Load) -> asyncio.Task | None:
    """One search; returns the task that posts its feedback (a user does not hold up the next one)."""
    window = load.window
    replica = n % 2
    body = {"query": QUERIES[n % len(QUERIES)], "user_id": f"soak-{run}-{n}"}
    response, ms = await _post(client, urls, replica, "/api/v1/search", body, load)
    stats = load.windows[window]
    stats.search_ms.append(ms)
    code = response.status_code if response is not None else "no answer"
    load.search_codes[code] += 1
    if code != 200:
        if len(load.errors) < 20:
            load.errors.append(f"search {code}: {response.text[:300] if response is not None else ''}")
        return None
    answer = response.json()
    request_id = answer["request_id"]
    load.event_ids.append(request_id)
    stats.candidate_served += answer["served_arm"] == "candidate"
    stats.fallbacks += answer["arm"] != answer["served_arm"]
    return asyncio.create_task(_feedback(client, urls, replica, n, request_id, window, load))


async def _feedback(client: httpx.AsyncClient, urls: list[str], replica: int, n: int, request_id: str,
                    window: str, load: Load) -> None:
    """Feedback on the event, to the replica that did not serve it; a 503 is retried after Retry-After."""
    stats = load.windows[window]
    feedback = {"request_id": request_id, "thumbs": "up" if n % 3 else "down", "rating": 1 + n % 5}
    started = time.perf_counter()
    deadline = started + 180
    first = True
    retries = 0
    while True:
        response, _ = await _post(client, urls, 1 - replica, "/api/v1/feedback", feedback, load)
        code = response.status_code if response is not None else "no answer"
        if first:
            load.feedback_first[code] += 1
            first = False
        # 503 is the documented "store unreachable and not in this replica's queue; retry shortly".
        if code != 503 or time.perf_counter() > deadline:
            break
        await asyncio.sleep(max(float(response.headers.get("retry-after", "2")), min(2.0 * 2**retries, 10.0)))
        retries += 1
    stats.feedback_ms.append((time.perf_counter() - started) * 1000)
    load.feedback_codes[code] += 1
    if code == 201:
        load.feedback_ok.append(request_id)
    elif len(load.errors) < 20:
        load.errors.append(f"feedback {code} at {time.perf_counter() - load.t0:.1f} s for {request_id} "
                           f"(sent in window {window}): "
                           f"{response.text[:300] if response is not None else ''}")


async def drive(urls: list[str], requests: int, concurrency: int, load: Load) -> float:
    run = uuid.uuid4().hex[:8]
    limits = httpx.Limits(max_connections=concurrency * 3, max_keepalive_connections=concurrency * 3)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits) as client:
        # Feedback runs beside the searches, unbounded: a user whose feedback is waiting out a 503
        # does not hold up the next user's search (the retries back off, so they do not storm).
        feedback: set[asyncio.Task] = set()

        async def worker() -> None:
            while load.sent < requests:
                n = load.sent
                load.sent += 1
                try:
                    task = await _search(client, urls, n, run, load)
                except Exception as error:  # a bug in the client must not look like a lost event
                    load.errors.append(f"client error: {error!r}")
                    task = None
                if task is not None:
                    feedback.add(task)
                    task.add_done_callback(lambda t: (feedback.discard(t), _check(t, load)))
                load.done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await asyncio.gather(*list(feedback))
        return time.perf_counter() - started


def _check(task: asyncio.Task, load: Load) -> None:
    if not task.cancelled() and task.exception() is not None:
        load.errors.append(f"client error: {task.exception()!r}")


# --------------------------------------------------------------------------------------------
# The faults


async def faults(cluster: Cluster, gate: Gate, load: Load, args: argparse.Namespace, timeline: list[str]) -> None:
    t0 = load.t0 = time.perf_counter()

    def mark(window: str, what: str) -> None:
        load.window = window
        timeline.append(f"{time.perf_counter() - t0:6.1f} s  {what} (requests done: {load.done})")
        log(what)

    await asyncio.sleep(BASELINE_S)
    mark("candidate killed", "candidate upstream SIGKILLed")
    await asyncio.to_thread(cluster.stop, "candidate", signal.SIGKILL)
    await asyncio.sleep(KILL_S)
    await asyncio.to_thread(cluster.start_stub, "candidate")
    mark("normal", "candidate upstream restarted")

    await asyncio.sleep(GAP_S)
    mark("candidate slow", f"candidate restarted with --delay-ms {SLOW_DELAY_MS}")
    await asyncio.to_thread(cluster.stop, "candidate")
    await asyncio.to_thread(cluster.start_stub, "candidate", SLOW_DELAY_MS)
    await asyncio.sleep(args.slow_s)
    await asyncio.to_thread(cluster.stop, "candidate")
    await asyncio.to_thread(cluster.start_stub, "candidate")
    mark("normal", "candidate back at full speed")

    await asyncio.sleep(GAP_S)
    mark("postgres unreachable", f"PostgreSQL gate closed for {args.outage_s:.0f} s")
    await gate.close()
    await asyncio.sleep(args.outage_s)
    await gate.open()
    mark("normal", "PostgreSQL gate open again")

    await asyncio.sleep(GAP_S)
    mark("replica restart", "replica0 SIGTERMed")
    await asyncio.to_thread(cluster.stop, "replica0")
    await asyncio.to_thread(cluster.start_replica, 0)
    mark("normal", "replica0 started again (same port, same spool dir)")


# --------------------------------------------------------------------------------------------
# Counting


def _gauges(url: str) -> dict[str, float]:
    try:
        body = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    return {m[1]: float(m[2]) for m in re.finditer(r"^(abloop_writer_\w+) ([0-9.e+-]+)$", body, re.M)}


def wait_drained(cluster: Cluster, urls: list[str], timeout: float) -> float:
    """Seconds until both writers have an empty queue and spool, and no spool file is left on disk."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        gauges = [_gauges(url) for url in urls]
        busy = any(not g or g.get("abloop_writer_queue_depth") or g.get("abloop_writer_spool_bytes") for g in gauges)
        on_disk = [p for p in cluster.work.glob("replica*/spool/*") if p.is_file()]
        if not busy and not on_disk:
            return time.monotonic() - started
        time.sleep(1)
    return float("nan")


def count(engine, event_ids: list[str]) -> dict[str, int]:
    with engine.connect() as conn:
        total, distinct = conn.execute(text("SELECT count(*), count(DISTINCT id) FROM search_events")).one()
        stored = {row[0] for row in conn.execute(text("SELECT id FROM search_events"))}
        feedback_rows = conn.execute(text("SELECT count(*) FROM feedback")).scalar_one()
        with_feedback = {row[0] for row in conn.execute(text("SELECT DISTINCT event_id FROM feedback"))}
        # Why the candidate's users were served by control: the first words of each event's error.
        reasons = Counter(row[0] for row in conn.execute(text(
            "SELECT left(coalesce(error, '?'), 90) FROM search_events WHERE status = 'fallback'")))
    expected = set(event_ids)
    return {
        "expected": len(expected),
        "stored": total,
        "duplicated": total - distinct,
        "lost": len(expected - stored),
        "unexpected": len(stored - expected),
        "feedback_rows": feedback_rows,
        "events_with_feedback": len(expected & with_feedback),
        "fallback_reasons": reasons,
    }


def _pct(values: list[float], q: float) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.quantiles(values, n=100, method='inclusive')[q - 1]:.0f}"


def _codes(counter: Counter) -> str:
    return ", ".join(f"{code}: {n}" for code, n in sorted(counter.items(), key=lambda kv: str(kv[0]))) or "–"


def report(args, load: Load, counts: dict[str, int], wall: float, drain_s: float, spool_bytes: int,
           rejected: int, timeline: list[str], schedule_done: bool, uptime: tuple[str, str]) -> tuple[str, list[str]]:
    searches = sum(load.search_codes.values())
    by_class = Counter()
    for counter in (load.search_codes, load.feedback_codes):
        for code, n in counter.items():
            by_class[f"{code // 100}xx" if isinstance(code, int) else str(code)] += n
    missed = []
    if not schedule_done:
        missed.append("the fault schedule did not finish while the load ran (raise --requests)")
    if counts["lost"]:
        missed.append(f"{counts['lost']} events lost")
    if counts["duplicated"]:
        missed.append(f"{counts['duplicated']} duplicated event ids")
    if by_class["5xx"]:
        missed.append(f"{by_class['5xx']} 5xx answers (final)")
    if load.search_codes[200] != searches:
        missed.append(f"{searches - load.search_codes[200]} searches not answered 200")
    if len(set(load.feedback_ok)) != counts["expected"]:
        missed.append(f"{counts['expected'] - len(set(load.feedback_ok))} events whose feedback was not accepted")
    if counts["events_with_feedback"] != len(set(load.feedback_ok)):
        missed.append(f"{len(set(load.feedback_ok)) - counts['events_with_feedback']} accepted feedback not stored")
    if rejected:
        missed.append(f"{rejected} files set aside under spool/rejected/")
    if load.errors and any(e.startswith("client error") for e in load.errors):
        missed.append("load generator errors")

    ok_searches = load.search_codes[200]
    lines = [
        f"## Soak under faults: {args.requests} requests at concurrency {args.concurrency}, "
        f"outage {args.outage_s:.0f} s, slow candidate {args.slow_s:.0f} s",
        "",
        f"uptime before: `{uptime[0]}`  ",
        f"uptime after:  `{uptime[1]}`",
        "",
        "| measure | value |",
        "|---|---|",
        f"| searches sent | {searches} |",
        f"| search answers by code | {_codes(load.search_codes)} |",
        f"| feedback answers by code (final) | {_codes(load.feedback_codes)} |",
        f"| feedback answers by code (first try) | {_codes(load.feedback_first)} |",
        f"| all answers by class (final) | {_codes(by_class)} |",
        f"| connections refused/cut, retried on the other replica | {_codes(load.transport_errors)} |",
        f"| events expected / stored / duplicated / lost | {counts['expected']} / {counts['stored']} / "
        f"{counts['duplicated']} / {counts['lost']} |",
        f"| feedback accepted / stored rows / events with stored feedback | {len(set(load.feedback_ok))} / "
        f"{counts['feedback_rows']} / {counts['events_with_feedback']} |",
        f"| spool bytes at the end / files set aside | {spool_bytes} / {rejected} |",
        f"| drain after the load | {drain_s:.1f} s |",
        f"| wall time (load) | {wall:.1f} s |",
        f"| throughput | {ok_searches / wall:.0f} searches/s (+ as many feedback POSTs) |",
        "",
        "| window | searches | search p50 ms | search p99 ms | feedback p50 ms | feedback p99 ms "
        "| served by candidate | fallbacks to control |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, w in load.windows.items():
        lines.append(f"| {name} | {len(w.search_ms)} | {_pct(w.search_ms, 50)} | {_pct(w.search_ms, 99)} | "
                     f"{_pct(w.feedback_ms, 50)} | {_pct(w.feedback_ms, 99)} | {w.candidate_served} | {w.fallbacks} |")
    lines += ["", "Timeline:", "", "```", *timeline, "```", ""]
    lines += ["Fallback reasons stored on the events (`search_events.error`, first 90 characters):", "", "```",
              *(f"{n:6d}  {reason}" for reason, n in counts["fallback_reasons"].most_common(8)), "```", ""]
    if load.errors:
        lines += ["First errors:", "", "```", *load.errors[:20], "```", ""]
    lines.append("**Goal met.**" if not missed else "**Goal missed:** " + "; ".join(missed) + ".")
    return "\n".join(lines), missed


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--outage-s", type=float, default=30.0)
    parser.add_argument("--slow-s", type=float, default=20.0)
    parser.add_argument("--drain-timeout-s", type=float, default=300.0)
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--keep-schema", action="store_true", help="leave the PostgreSQL schema for a look")
    parser.add_argument("--gate", action="store_true", help=argparse.SUPPRESS)  # internal: the gate process
    args = parser.parse_args(argv)
    if min(args.requests, args.concurrency) < 1 or min(args.outage_s, args.slow_s) < 0:
        parser.error("--requests and --concurrency must be positive, durations not negative")
    return args


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gate:
        _gate_main()
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    uptime_before = _uptime()
    work = Path(tempfile.mkdtemp(prefix="abloop-soak-"))
    (work / "logs").mkdir()
    procs = Processes(work / "logs")
    schema = f"soak_{uuid.uuid4().hex[:12]}"
    admin = create_engine(normalize_url(POSTGRES))
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    engine = create_engine(normalize_url(POSTGRES) + f"?options=-csearch_path%3D{schema}")
    log(f"work dir {work}, schema {schema}")
    try:
        gate = Gate(procs)
        cluster = Cluster(procs, work, f"postgresql://postgres@127.0.0.1:{gate.port}/test"
                                       f"?options=-csearch_path%3D{schema}")
        cluster.start_stub("control")
        cluster.start_stub("candidate")
        for index in range(2):  # one after the other: the first one migrates the fresh schema
            cluster.start_replica(index)
        urls = [f"http://127.0.0.1:{port}" for port in cluster.replica_ports]
        experiment = httpx.get(urls[1] + "/api/v1/admin/experiment", timeout=10,
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
        log(f"replicas at {urls}; experiment candidate_share={experiment.get('candidate_share')}")

        load, timeline = Load(), []

        async def run() -> tuple[float, bool]:
            schedule = asyncio.create_task(faults(cluster, gate, load, args, timeline))
            wall = await drive(urls, args.requests, args.concurrency, load)
            done = schedule.done()
            if not done:
                timeline.append("load finished before the fault schedule; waiting for it to end")
            await schedule  # leave every server up before counting
            return wall, done

        wall, schedule_done = asyncio.run(run())
        log(f"load done in {wall:.1f} s; waiting for the spools to drain")
        drain_s = wait_drained(cluster, urls, args.drain_timeout_s)
        counts = count(engine, load.event_ids)
        spool_bytes, rejected = cluster.spool_bytes(), len(cluster.rejected_files())
        text_, missed = report(args, load, counts, wall, drain_s, spool_bytes, rejected, timeline, schedule_done,
                               (uptime_before, _uptime()))
        print(text_)
        if args.out:
            args.out.write_text(text_ + "\n")
        log(f"logs in {work / 'logs'}")
        return 1 if missed else 0
    finally:
        procs.stop_all()
        engine.dispose()
        if not args.keep_schema:
            with admin.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


if __name__ == "__main__":
    sys.exit(main())
