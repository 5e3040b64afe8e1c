"""The installed `abloop` console script, driven as a user drives it: subprocesses, exit codes, output.

One store, index and model server for the module, used in the order an operator would: migrate, build
the index, serve a model and the proxy, search, build a dataset, train, gate, evaluate, promote, status,
report. The model is a tiny random Llama (SmolLM2's tokenizer) so the module takes about a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import inspect

from store import experiments
from store.db import Database
from tests.conftest import free_port
from tests.experiment import traffic
from tests.experiment.traffic import ArmBehaviour

pytestmark = pytest.mark.slow

ABLOOP = shutil.which("abloop", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, str]:
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in ("for", "while", "if", "try", "with"):
        (corpus / f"{name}.txt").write_text(topics[name])
    return {"root": str(root), "corpus": str(corpus), "DATABASE_URL": f"sqlite:///{root / 'abloop.db'}",
            "INDEX_DIR": str(root / "index"), "RUNS_DIR": str(root / "runs"), "SPOOL_DIR": str(root / "spool")}


@pytest.fixture
def db(workspace) -> Database:
    database = Database(workspace["DATABASE_URL"])
    database.migrate()  # what `abloop migrate` did, so that each test also runs alone
    return database


def _env(workspace: dict[str, str], **extra: str) -> dict[str, str]:
    keys = ("DATABASE_URL", "INDEX_DIR", "RUNS_DIR", "SPOOL_DIR")
    return {**os.environ, **{k: workspace[k] for k in keys}, **extra}


def abloop(workspace: dict[str, str], *args: str, expect: int | None = 0, **env: str) -> subprocess.CompletedProcess:
    """Run the command; check its exit code unless `expect` is None."""
    done = subprocess.run([ABLOOP, *args], env=_env(workspace, **env), cwd=workspace["root"], capture_output=True,
                          text=True, timeout=600)
    if expect is not None:
        assert done.returncode == expect, f"abloop {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@contextmanager
def running(workspace: dict[str, str], *args: str, ready: str, **env: str) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen([ABLOOP, *args], env=_env(workspace, **env), cwd=workspace["root"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"abloop {' '.join(args)} exited: {process.stdout.read()}"
            try:
                if httpx.get(ready, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"abloop {' '.join(args)} not ready at {ready}"
            time.sleep(0.3)
        yield process
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def built_index(workspace) -> dict:
    return json.loads(abloop(workspace, "index", "build", "--corpus", workspace["corpus"]).stdout)


def test_migrate_and_build_the_index(workspace, built_index):
    abloop(workspace, "migrate")
    assert {"search_events", "feedback", "experiments"} <= set(
        inspect(Database(workspace["DATABASE_URL"]).engine).get_table_names())
    built = built_index
    assert built["documents"] == 5 and built["chunks"] >= 5 and built["metadata"] == "off"
    assert (Path(workspace["INDEX_DIR"]) / built["index_version"]).is_dir()


def test_serve_model_and_proxy_answer_a_search(workspace, db, built_index, tiny_model_dir):
    model_port, proxy_port = free_port(), free_port()
    with running(workspace, "serve-model", "--model", str(tiny_model_dir), "--port", str(model_port),
                 ready=f"http://127.0.0.1:{model_port}/healthz"):
        model = httpx.get(f"http://127.0.0.1:{model_port}/v1/models").json()["data"][0]["id"]
        with running(workspace, "proxy", "--port", str(proxy_port), ready=f"http://127.0.0.1:{proxy_port}/readyz",
                     LLM_API_BASE=f"http://127.0.0.1:{model_port}/v1", LLM_MODEL=model, LLM_MAX_TOKENS="4"):
            answer = httpx.post(f"http://127.0.0.1:{proxy_port}/api/v1/search", timeout=60,
                                json={"query": "how does a for loop work?", "user_id": "cli-user"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == model and answer.json()["items"]
            request_id = answer.json()["request_id"]
            feedback = httpx.post(f"http://127.0.0.1:{proxy_port}/api/v1/feedback",
                                  json={"request_id": request_id, "thumbs": "up"})
            assert feedback.status_code == 201
    # Stopping the proxy flushed its writer: the event and its feedback are in the store.
    status = json.loads(abloop(workspace, "status", "--json").stdout)
    assert status["search_events"] >= 1 and status["feedback"] >= 1


def test_dataset_train_and_gate(workspace, db, tiny_model_dir):
    from abloop.simulate import simulate_traffic

    simulate_traffic(db, n_queries=60, seed=2, days=1.0)
    data, adapters = Path(workspace["root"]) / "data", Path(workspace["root"]) / "adapters"
    abloop(workspace, "dataset", "build", "--out", str(data))
    assert (data / "train.jsonl").stat().st_size > 0
    trained = json.loads(abloop(workspace, "train", "--data", str(data), "--out", str(adapters), "--base",
                                str(tiny_model_dir), "--max-steps", "2").stdout)
    adapter_dir = Path(trained["adapter_dir"])
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert trained["adapter"].startswith(tiny_model_dir.name)
    done = abloop(workspace, "eval-adapter", "--data", str(data), "--adapter", str(adapter_dir),
                  "--base", str(tiny_model_dir), expect=None)
    gated = json.loads(done.stdout)
    assert done.returncode == (0 if gated["passed"] else 1)  # a failed gate is a failed command
    assert gated["holdout"]["n"] > 0 and gated["adapter"] == adapter_dir.name


def test_evaluate_promote_status_and_report(workspace, db):
    from experiment import lifecycle

    traffic.start(db)  # the running experiment (the proxy above may have seeded it without a candidate)
    running_experiment = lifecycle.start_candidate(db, base_url="http://candidate.test/v1", model="candidate-v2",
                                                   share=0.5)
    traffic.write(db, running_experiment, users=600, control=ArmBehaviour(up=0.3), candidate=ArmBehaviour(up=0.7))
    verdict = json.loads(abloop(workspace, "evaluate", "--json").stdout)
    assert verdict["experiment_id"] == running_experiment.id
    assert verdict["decision"]["action"] == "promote", verdict["decision"]
    assert verdict["arms"]["candidate"]["users"] + verdict["arms"]["control"]["users"] == 600

    abloop(workspace, "promote", "--experiment", running_experiment.id)
    assert experiments.get(db, running_experiment.id).status == "promoted"
    shown = abloop(workspace, "status", "--experiment", running_experiment.id).stdout
    assert "promoted" in shown and running_experiment.id in shown
    refused = abloop(workspace, "rollback", "--experiment", running_experiment.id, expect=1)
    assert len(refused.stderr.strip().splitlines()) == 1 and "not running" in refused.stderr

    reports = Path(workspace["root"]) / "reports"
    written = json.loads(abloop(workspace, "report", "--experiment", running_experiment.id, "--out",
                                str(reports)).stdout)
    page = Path(written["report"]).read_text()
    assert "promote" in page.lower() and "<svg" in page
