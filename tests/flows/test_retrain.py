"""The `retrain` flow end to end as a real Prefect run, with small sizes.

Logged (simulated) traffic -> dataset -> a few LoRA steps on a tiny random Llama -> offline gate ->
adapter registered -> loaded by a real model server -> a candidate experiment that the server answers for.
"""

from __future__ import annotations

import httpx
import pytest

from abloop.simulate import simulate_traffic
from store import experiments
from store.db import Database
from tests.training.conftest import base_model_dir, tiny_model_dir  # noqa: F401
from training.registry import get_adapter

pytestmark = pytest.mark.slow


@pytest.fixture
def store(tmp_path, monkeypatch) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'retrain.db'}")
    db.migrate()
    monkeypatch.setenv("DATABASE_URL", db.url)
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    return db


@pytest.fixture
def model_server(tiny_model_dir):  # noqa: F811
    from serving.app import create_app
    from serving.server import ServerThread

    with ServerThread(create_app(model=str(tiny_model_dir))) as server:
        yield server


def test_retrain_trains_gates_registers_loads_and_starts_a_candidate(store, model_server, tiny_model_dir):  # noqa: F811
    from flows.retrain import retrain

    simulate_traffic(store, n_queries=80, seed=3, days=1.0)
    outcome = retrain(candidate_server=model_server.base_url, candidate_share=0.25, days=2, max_steps=12,
                      learning_rate=3e-3, batch_size=2, lora_dropout=0.0, min_examples=5, base=str(tiny_model_dir))

    assert outcome["status"] == "candidate", outcome
    assert outcome["adapter"]["metrics"]["params"]["batch_size"] == 2
    assert outcome["adapter"]["metrics"]["params"]["lora_dropout"] == 0.0
    name = outcome["adapter"]["name"]
    assert name.startswith(tiny_model_dir.name)  # named after the base it was trained on
    gate = outcome["gate"]
    assert gate["passed"] and gate["holdout"]["loss_adapter"] < gate["holdout"]["loss_base"]
    registered = get_adapter(store, name)
    assert registered is not None and registered.id == outcome["adapter"]["adapter_id"]
    assert registered.eval_metrics["passed"] is True

    served = {m["id"] for m in httpx.get(f"{model_server.base_url}/models").json()["data"]}
    assert name in served
    answer = httpx.post(f"{model_server.base_url}/chat/completions", timeout=60, json={
        "model": name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "temperature": 0})
    assert answer.status_code == 200 and answer.json()["model"] == name

    running = experiments.get_running(store)
    assert running.id == outcome["experiment_id"]
    assert (running.candidate_base_url, running.candidate_model) == (model_server.base_url, name)
    assert running.candidate_adapter_id == registered.id and running.candidate_share == 0.25


def test_retrain_skips_without_enough_data(store, model_server, tiny_model_dir):  # noqa: F811
    from flows.retrain import retrain

    outcome = retrain(candidate_server=model_server.base_url, days=2, max_steps=2, min_examples=5,
                      base=str(tiny_model_dir))
    assert outcome["status"] == "skipped" and outcome["reason"] == "not enough data"
    assert experiments.get_running(store) is None  # nothing trained, nothing started
