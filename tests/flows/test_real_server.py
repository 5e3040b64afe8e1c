"""prefect.yaml on a real Prefect server, the way README "Run it on a Prefect server" does it: `prefect
server start`, the two pools, `prefect deploy`, the server's scheduler, and a process worker that runs
evaluate_arms from this clone against a seeded store to Completed, read back through Prefect's client.

Everything runs in subprocesses with an explicit environment: the session's `prefect_test_harness`
(tests/flows/conftest.py) points this process's Prefect settings at another server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from store import experiments
from store.config import OFFLINE_ENV
from tests.conftest import free_port
from tests.flows.artifacts import artifacts_by_key
from tests.flows.deployments import DEPLOYMENTS, ROOT
from tests.flows.seeded import promotable_experiment

pytestmark = pytest.mark.slow  # a server, a worker and a flow-run process: about a minute on 2 cores

PREFECT = str(Path(sys.executable).with_name("prefect"))
# Start-up and run deadlines for a loaded 2-core machine; reaching one is a failure, not a measurement.
READY_S, RUN_S = 180, 300


@contextmanager
def _process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A command in its own process group, so that ending it also ends what it started (flow-run processes)."""
    with open(log, "wb") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(20)
                    break
                except subprocess.TimeoutExpired:
                    continue


def _prefect(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=RUN_S)
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _wait_healthy(server: subprocess.Popen, api_url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited:\n{log.read_text()}"
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy:\n{log.read_text()}")


@pytest.fixture
def server(tmp_path) -> Iterator[tuple[str, dict[str, str]]]:
    """A `prefect server start` of its own; yields its API URL and the environment a CLI call against it needs."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env = inherited | OFFLINE_ENV | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api_url, "PREFECT_CLI_PROMPT": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING", "ABLOOP_HOME": str(ROOT), "COLUMNS": "200",
    }
    log = tmp_path / "server.log"
    with _process([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log) as process:
        _wait_healthy(process, api_url, log)
        yield api_url, env


def _scheduled_deployments(api_url: str, ids: list[str]) -> set[str]:
    """Of these deployments, those the server's scheduler has given a run."""
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids)))
    return {str(run.deployment_id) for run in runs if run.auto_scheduled}


def test_deploy_schedule_and_run_on_a_real_server(server, tmp_path):
    api_url, env = server
    for pool in ("cpu", "gpu"):
        _prefect(env, "work-pool", "create", pool, "--type", "process", "--overwrite")
    _prefect(env, "deploy", "--all")

    listed = {d["name"]: d for d in json.loads(_prefect(env, "deployment", "ls", "--output", "json"))}
    assert set(listed) == {d["name"] for d in DEPLOYMENTS}
    for expected in DEPLOYMENTS:
        deployed = listed[expected["name"]]
        assert deployed["work_pool_name"] == expected["work_pool"]["name"]
        assert [s["schedule"]["cron"] for s in deployed["schedules"]] == [s["cron"] for s in expected["schedules"]]

    # The scheduler service really schedules (under SQLAlchemy 2.1 it failed on every insert).
    scheduled = {listed[d["name"]]["id"] for d in DEPLOYMENTS if d["schedules"]}
    deadline = time.monotonic() + READY_S
    while _scheduled_deployments(api_url, sorted(scheduled)) != scheduled:
        assert time.monotonic() < deadline, "the server's scheduler created no runs; see its log"
        time.sleep(1)

    # The server holds each deployment's parameter schema: an operator's value out of bounds
    # (flows/parameters.py) is refused when the run is asked for, by the parameter's name.
    refused = subprocess.run([PREFECT, "deployment", "run", "retrain/retrain", "--param", "epochs=0"], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=RUN_S)
    assert refused.returncode != 0, refused.stdout
    assert "Validation failed for field 'epochs'" in refused.stdout + refused.stderr, refused

    db, running = promotable_experiment(tmp_path / "abloop.db")
    created = _prefect(env, "deployment", "run", "evaluate_arms/evaluate_arms", "--param", "score_sample=0")
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", created).group(1)
    # Runs scheduled for later stay where they are: the worker takes only what is due now.
    worker_env = env | {"DATABASE_URL": db.url, "PREFECT_WORKER_PREFETCH_SECONDS": "0"}
    worker_log = tmp_path / "worker.log"
    with _process([PREFECT, "worker", "start", "--pool", "cpu", "--run-once", "--limit", "1"], worker_env,
                  worker_log) as worker:
        assert worker.wait(RUN_S) == 0, worker_log.read_text()

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        assert run.state.is_completed(), f"{run.state}\n{worker_log.read_text()}"
        assert run.parameters == {"score_sample": 0}
        by_key = artifacts_by_key(flow_run_id)
    assert {"arms", "decision"} <= set(by_key) and "promote" in by_key["decision"].data
    # The worker's DATABASE_URL reached the flow: the decision acted on the seeded store.
    assert experiments.get(db, running.id).status == "promoted"
