"""`abloop proxy --workers N`: the real command as a subprocess, its workers on one socket, nothing lost.

Each worker has its own event writer and spool file in one SPOOL_DIR; the parent migrates the store once;
/metrics sums every worker's series (prometheus_client's multiprocess files, whose names carry each
worker's pid: that is how the tests see that both workers served); SIGTERM drains every writer.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, inspect, select

from abloop.cli import _usable_cores, build_parser, cmd_proxy
from store.db import normalize_url
from store.models import Feedback, SearchEvent
from tests.conftest import free_port
from tests.proxy.conftest import ADMIN_TOKEN, make_settings, running_proxy
from tests.store.conftest import pg_admin, pg_url  # noqa: F401 - fixtures: a fresh PostgreSQL schema

ABLOOP = shutil.which("abloop", path=str(Path(sys.executable).parent))
SEARCHES = 300
CONCURRENCY = 20
# Variables of the caller's shell that would change what is measured.
_NOT_INHERITED = ("PROMETHEUS_MULTIPROC_DIR", "WEB_CONCURRENCY", "REDIS_URL", "CANDIDATE_SHARE",
                  "LLM_API_BASE_NEW_MODEL", "DATABASE_URL", "INDEX_DIR", "SPOOL_DIR")
_METRICS_DIR_LOGGED = re.compile(r"metrics of all workers in ([^\s\"',]+)")


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def metrics_dir(self) -> Path:
        found = _METRICS_DIR_LOGGED.search(self.log.read_text(errors="replace"))
        assert found, f"the parent did not say where the metrics go:\n{self.log.read_text(errors='replace')}"
        return Path(found.group(1))

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def wait_for(self, condition, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"the server exited:\n{self.log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, f"not {what} after {timeout:.0f} s:\n" + self.log.read_text(
                errors="replace")[-4000:]
            time.sleep(0.3)

    def workers(self) -> float:
        try:
            return self.scrape().get(("abloop_workers", ()), 0.0)
        except httpx.HTTPError:
            return 0.0


@contextmanager
def serving(tmp_path: Path, database_url: str, upstream: str, workers: int = 2, **env: str) -> Iterator[Server]:
    """`abloop proxy --workers N` on the stub upstream, retrieval off; stopped with SIGTERM, which must exit 0."""
    port = free_port()
    environ = {key: value for key, value in os.environ.items() if key not in _NOT_INHERITED}
    environ.update(DATABASE_URL=database_url, INDEX_DIR=str(tmp_path / "index"), SPOOL_DIR=str(tmp_path / "spool"),
                   LLM_API_BASE=upstream, LLM_MODEL="control-model", RATE_LIMIT_PER_MINUTE="0",
                   ADMIN_TOKEN=ADMIN_TOKEN, **env)
    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([ABLOOP, "proxy", "--port", str(port), "--workers", str(workers)], env=environ,
                                   cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        # Every worker publishes `abloop_workers` 1 when its app has started: all of them are serving.
        server.wait_for(lambda: server.workers() == workers, f"{workers} workers serving")
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
    assert process.returncode == 0, log.read_text(errors="replace")[-4000:]


async def _searches_and_feedback(url: str, n: int) -> tuple[list[str], list[int]]:
    """n searches at CONCURRENCY, then a thumbs-up for each; every request on a new connection, which the
    kernel hands to any worker. Returns the request ids and the feedback statuses."""
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def search(i: int) -> str:
            async with gate:
                response = await client.post("/api/v1/search", json={"query": f"question {i}", "user_id": f"u{i}"})
            assert response.status_code == 200, response.text
            return response.json()["request_id"]

        async def thumbs_up(request_id: str) -> int:
            async with gate:
                response = await client.post("/api/v1/feedback", json={"request_id": request_id, "thumbs": "up"})
            return response.status_code

        ids = await asyncio.gather(*(search(i) for i in range(n)))
        statuses = await asyncio.gather(*(thumbs_up(request_id) for request_id in ids))
    return list(ids), list(statuses)


def _searches_per_pid(metrics_dir: Path) -> dict[int, float]:
    """Search requests counted by each process, from its own multiprocess file (`counter_<pid>.db`)."""
    counted = {}
    for path in metrics_dir.glob("counter_*.db"):
        families = MultiProcessCollector.merge([str(path)])
        counted[int(path.stem.removeprefix("counter_"))] = sum(
            sample.value for family in families if family.name == "abloop_search_requests"
            for sample in family.samples)
    return counted


def _live_pids(metrics_dir: Path) -> set[int]:
    return {int(path.stem.rpartition("_")[2]) for path in metrics_dir.glob("gauge_livesum_*.db")}


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return int(stat.read().rsplit(b")", 1)[1].split()[1])


def _stored(database_url: str) -> tuple[list[str], list[tuple[str, str]]]:
    engine = create_engine(normalize_url(database_url))
    try:
        with engine.connect() as connection:
            events = list(connection.scalars(select(SearchEvent.id)))
            feedback = [tuple(row) for row in connection.execute(select(Feedback.event_id, Feedback.thumbs))]
    finally:
        engine.dispose()
    return events, feedback


def _stale_counter(metrics_dir: Path, pid: int, value: float) -> None:
    """What an earlier server left in the directory: `value` searches counted by `pid`."""
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    stale = MmapedDict(str(metrics_dir / f"counter_{pid}.db"))
    key = mmap_key("abloop_search_requests", "abloop_search_requests_total", ["arm", "served_arm", "status"],
                   ["control", "control", "ok"], "Search requests by assigned arm, served arm and status.")
    stale.write_value(key, value, 0.0)
    stale.close()


def _check_stored(database_url: str, request_ids: list[str]) -> None:
    events, feedback = _stored(database_url)
    assert len(events) == len(request_ids) and set(events) == set(request_ids)  # every event, exactly once
    assert sorted(feedback) == sorted((request_id, "up") for request_id in request_ids)


def test_two_workers_serve_and_lose_nothing(tmp_path, control_upstream):
    database_url = f"sqlite:///{tmp_path / 'abloop.db'}"
    metrics_dir = tmp_path / "metrics"  # an operator's PROMETHEUS_MULTIPROC_DIR, with an earlier server's file
    metrics_dir.mkdir()
    _stale_counter(metrics_dir, pid=1, value=1000)
    with serving(tmp_path, database_url, control_upstream[1], PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)) as server:
        workers = _live_pids(metrics_dir)
        assert len(workers) == 2 and {_parent_of(pid) for pid in workers} == {server.process.pid}
        request_ids, statuses = asyncio.run(_searches_and_feedback(server.url, SEARCHES))
        assert statuses == [201] * SEARCHES
        per_pid = _searches_per_pid(metrics_dir)
        assert set(per_pid) == workers, "the earlier server's file was not cleared"
        assert all(count > 0 for count in per_pid.values()), f"one worker served everything: {per_pid}"
        # /metrics, whichever worker answers it, is the whole server's.
        for _ in range(3):
            metrics = server.scrape()
            assert sum(v for (name, _), v in metrics.items() if name == "abloop_search_requests_total") == SEARCHES
            assert metrics[("abloop_feedback_total", (("kind", "thumbs_up"),))] == SEARCHES
            assert metrics[("abloop_workers", ())] == 2
            for name in ("abloop_writer_queue_depth", "abloop_writer_spool_bytes", "abloop_candidate_share",
                         "abloop_open_circuits"):
                assert (name, ()) in metrics, name  # one series each: no `pid` label
    # SIGTERM: both workers flushed their writers before exiting.
    _check_stored(database_url, request_ids)
    ready = [json.loads(line) for line in server.log.read_text(errors="replace").splitlines()
             if '"proxy ready' in line]
    assert len(ready) == 2 and all(line["gc_frozen_objects"] > 10_000 for line in ready), ready  # a served heap
    assert metrics_dir.is_dir(), "an operator's directory is theirs to keep"


@pytest.mark.postgres
def test_a_killed_worker_is_replaced_and_leaves_the_live_gauges_on_postgres(tmp_path, control_upstream,
                                                                           pg_url):  # noqa: F811
    with serving(tmp_path, pg_url, control_upstream[1]) as server:
        metrics_dir = server.metrics_dir()  # the parent's own temporary directory
        assert metrics_dir.is_dir()
        victim, survivor = sorted(_live_pids(metrics_dir))
        os.kill(victim, signal.SIGKILL)
        # uvicorn starts a replacement; a scrape forgets the killed worker's live gauges (its pid is gone),
        # so the count of workers is 2 again, not 3.
        server.wait_for(lambda: server.workers() == 2 and len(_live_pids(metrics_dir) - {survivor}) == 1
                        and victim not in _live_pids(metrics_dir), "the killed worker replaced")
        request_ids, statuses = asyncio.run(_searches_and_feedback(server.url, 100))
        assert statuses == [201] * 100
        assert sum(_searches_per_pid(metrics_dir).values()) == 100
    _check_stored(pg_url, request_ids)
    assert not metrics_dir.exists(), "the parent's temporary metrics directory outlived it"


# The parent, without starting a server (uvicorn.run is replaced by a recorder).


@pytest.fixture
def uvicorn_runs(monkeypatch, tmp_path) -> list[dict]:
    import uvicorn

    runs: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: runs.append(
        {"app": app, **options, "environ": dict(os.environ)}))
    # Set here so that what cmd_proxy exports is undone after the test.
    monkeypatch.setenv("WEB_CONCURRENCY", "")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'abloop.db'}")
    return runs


def test_workers_default_to_the_usable_cores(uvicorn_runs, monkeypatch):
    assert _usable_cores() == len(os.sched_getaffinity(0))
    cmd_proxy(build_parser().parse_args(["proxy"]))
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    cmd_proxy(build_parser().parse_args(["proxy"]))
    assert [run["workers"] for run in uvicorn_runs] == [len(os.sched_getaffinity(0)), 3]
    assert [run["environ"]["WEB_CONCURRENCY"] for run in uvicorn_runs] == [str(len(os.sched_getaffinity(0))), "3"]


def test_one_worker_is_one_plain_process(uvicorn_runs, tmp_path):
    cmd_proxy(build_parser().parse_args(["proxy", "--workers", "1"]))
    (run,) = uvicorn_runs
    assert run["app"] == "proxy.app:create_served_app" and run["workers"] == 1
    assert "PROMETHEUS_MULTIPROC_DIR" not in run["environ"]
    assert not (tmp_path / "abloop.db").exists()  # the app migrates, as it always has


def test_the_server_is_started_as_asked(uvicorn_runs, monkeypatch):
    from store.config import Settings
    from store.logs import logging_config

    monkeypatch.setenv("LOG_FORMAT", "json")
    cmd_proxy(build_parser().parse_args(["proxy", "--workers", "1", "--host", "0.0.0.0", "--port", "9001",
                                         "--log-level", "warning"]))
    (run,) = uvicorn_runs
    options = {key: run[key] for key in ("factory", "host", "port", "log_level", "access_log")}
    assert options == {"factory": True, "host": "0.0.0.0", "port": 9001, "log_level": "warning", "access_log": False}
    secrets = Settings().secret_values()
    assert run["log_config"] == logging_config(format="json", level="INFO", secrets=secrets)  # uvicorn logs as we do


def test_several_workers_get_a_migrated_store_and_one_metrics_directory(uvicorn_runs, tmp_path):
    (tmp_path / "metrics").mkdir()
    _stale_counter(tmp_path / "metrics", pid=1, value=5)
    cmd_proxy(build_parser().parse_args(["proxy", "--workers", "3"]))
    (run,) = uvicorn_runs
    assert run["app"] == "proxy.app:create_worker_app" and run["workers"] == 3
    assert run["environ"]["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "metrics")
    assert list((tmp_path / "metrics").iterdir()) == []
    engine = create_engine(f"sqlite:///{tmp_path / 'abloop.db'}")
    assert {"search_events", "feedback", "alembic_version"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_zero_workers_is_refused(uvicorn_runs):
    with pytest.raises(SystemExit, match="at least 1"):
        cmd_proxy(build_parser().parse_args(["proxy", "--workers", "0"]))
    assert uvicorn_runs == []


# The rate limit of one worker among several (no Redis): its share of each user's budget.


def test_each_worker_allows_its_share_of_a_users_budget(tmp_path, control_upstream, monkeypatch):
    monkeypatch.setenv("WEB_CONCURRENCY", "2")
    settings = make_settings(tmp_path, llm_api_base=control_upstream[1], llm_model="control-model",
                             rate_limit_per_minute=2, rate_limit_burst=4)  # no refill during the test
    with running_proxy(settings) as (url, _app), httpx.Client(timeout=30) as client:
        statuses = [client.post(f"{url}/api/v1/search", json={"query": "q", "user_id": "alice"}).status_code
                    for _ in range(3)]
        other = client.post(f"{url}/api/v1/search", json={"query": "q", "user_id": "bob"}).status_code
    assert statuses == [200, 200, 429] and other == 200
