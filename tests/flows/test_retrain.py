"""The `retrain` flow end to end as a real Prefect run, with small sizes.

Logged (simulated) traffic -> dataset -> a few LoRA steps on a tiny random Llama -> offline gate ->
adapter registered -> loaded by a real model server -> a candidate experiment that the server answers for.
"""

from __future__ import annotations

import httpx
import pytest
from prefect.exceptions import ParameterTypeError

from abloop.simulate import simulate_traffic
from store import experiments
from tests.training.conftest import base_model_dir, tiny_model_dir  # noqa: F401
from training.registry import get_adapter

pytestmark = pytest.mark.slow


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


def test_an_adapter_that_fails_the_gate_is_never_served(store, model_server, tiny_model_dir):  # noqa: F811
    """A learning rate far too high makes the adapter worse on the holdout: rejected, not loaded, no experiment."""
    from flows.retrain import retrain

    simulate_traffic(store, n_queries=80, seed=3, days=1.0)
    outcome = retrain(candidate_server=model_server.base_url, days=2, max_steps=4, learning_rate=5.0, batch_size=2,
                      lora_dropout=0.0, min_examples=5, base=str(tiny_model_dir))

    assert outcome["status"] == "rejected", outcome
    gate = outcome["gate"]
    assert not gate["passed"] and gate["reasons"]
    name = outcome["adapter"]["name"]
    assert get_adapter(store, name).eval_metrics["passed"] is False  # registered, with the verdict
    served = {m["id"] for m in httpx.get(f"{model_server.base_url}/models").json()["data"]}
    assert name not in served
    assert experiments.get_running(store) is None


def test_retrain_skips_without_enough_data(store, model_server, tiny_model_dir):  # noqa: F811
    from flows.retrain import retrain

    outcome = retrain(candidate_server=model_server.base_url, days=2, max_steps=2, min_examples=5,
                      base=str(tiny_model_dir))
    assert outcome["status"] == "skipped" and outcome["reason"] == "not enough data"
    assert experiments.get_running(store) is None  # nothing trained, nothing started


@pytest.mark.parametrize(("holdout", "min_holdout"), [(0, None), (2, None), (4, 5)])  # None: the default, 3
def test_retrain_skips_when_the_holdout_is_too_small_to_gate(store, monkeypatch, holdout, min_holdout):
    """Enough training rows but (almost) no holdout: the gate could not run, or would judge on one or two rows'
    luck, so nothing is trained and the run ends skipped, as with too few training rows (not failed after
    training). The dataset is replaced here; training must not start."""
    import flows.retrain

    card = {"counts": {"train": 30, "holdout": holdout}, "content_hash": "0" * 64}
    monkeypatch.setattr(flows.retrain, "build_training_data", lambda *_: card)

    def no_training(*_, **__):
        raise AssertionError("trained although the holdout is too small to gate")

    monkeypatch.setattr(flows.retrain, "train_adapter", no_training)
    chosen = {} if min_holdout is None else {"min_holdout": min_holdout}
    outcome = flows.retrain.retrain(min_examples=5, **chosen)

    assert outcome == {"status": "skipped", "reason": "not enough data", "dataset": card}
    assert experiments.get_running(store) is None


def test_train_adapter_passes_every_training_option_on(tmp_path, monkeypatch):
    """The task hands train_lora what the flow was given: a GPU worker's epochs, 4-bit and compile too."""
    import training.train
    from flows.retrain import train_adapter

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    given = {}

    def recording_train_lora(data_dir, out_root, **options):
        given.update(options, data_dir=data_dir, out_root=out_root)
        return training.train.TrainResult(adapter_dir=out_root / "a", name="a", metrics={"m": 1}, adapter_id="id")

    monkeypatch.setattr(training.train, "train_lora", recording_train_lora)
    result = train_adapter.fn(str(tmp_path / "data"), str(tmp_path / "out"), str(base), "sqlite://",
                              max_steps=None, epochs=2.5, learning_rate=1e-3, batch_size=16, lora_dropout=0.0,
                              load_in_4bit=True, torch_compile=True)

    assert result == {"name": "a", "adapter_dir": str(tmp_path / "out" / "a"), "adapter_id": "id", "metrics": {"m": 1}}
    db = given.pop("db")
    assert db.url == "sqlite://"
    assert given == {"data_dir": tmp_path / "data", "out_root": tmp_path / "out", "base_model_dir": base.resolve(),
                     "max_steps": None, "epochs": 2.5, "learning_rate": 1e-3, "batch_size": 16, "lora_dropout": 0.0,
                     "load_in_4bit": True, "torch_compile": True}


@pytest.mark.parametrize(("parameter", "value", "says"), [
    ("epochs", 0, "greater than 0"),
    ("max_steps", 0, "greater than or equal to 1"),
    ("batch_size", 0, "greater than or equal to 1"),
    ("candidate_share", 1.5, "less than or equal to 1"),
    ("candidate_share", -0.1, "greater than or equal to 0"),
    ("lora_dropout", 1.0, "less than 1"),
    ("lora_dropout", -0.1, "greater than or equal to 0"),
    ("learning_rate", -1e-4, "greater than 0"),
])
def test_a_bad_parameter_is_refused_by_name_before_anything_runs(store, parameter, value, says, tmp_path):
    from flows.retrain import retrain

    with pytest.raises(ParameterTypeError) as refused:
        retrain(**{parameter: value}, min_examples=1)
    assert f"{parameter}: Input should be {says}" in str(refused.value)
    assert not (tmp_path / "runs").exists()  # no dataset was built


def test_a_bad_rollout_plan_is_refused_before_the_dataset_is_built(store, tmp_path):
    from flows.retrain import retrain

    with pytest.raises(ValueError, match=r"rollout\.steps: shares must rise strictly"):
        retrain(rollout={"steps": [0.5, 0.25]}, min_examples=1)
    assert not (tmp_path / "runs").exists()


def test_4bit_without_a_cuda_gpu_is_refused_before_the_dataset_is_built(store, tmp_path):
    from flows.retrain import retrain

    with pytest.raises(ValueError, match="^load_in_4bit needs a CUDA GPU; on CPU train the unquantised base instead$"):
        retrain(load_in_4bit=True, min_examples=1)
    assert not (tmp_path / "runs").exists()


def test_a_rollout_plan_starts_the_candidate_at_its_first_step(store, monkeypatch):
    """With `rollout`, the candidate starts at 0% and the plan moves it to its first step (not to
    `candidate_share`): if attaching the plan failed, no user would have reached the new adapter.
    Training, the gate and the model server are replaced here; the experiment's start is real."""
    import flows.retrain

    loaded = []
    monkeypatch.setattr(flows.retrain, "build_training_data",
                        lambda *_: {"counts": {"train": 30, "holdout": 4}, "content_hash": "0" * 64})
    monkeypatch.setattr(flows.retrain, "train_adapter", lambda *_, **__: {
        "name": "adapter-a", "adapter_dir": "/adapters/a", "adapter_id": None, "metrics": {}})
    monkeypatch.setattr(flows.retrain, "gate_adapter", lambda *_: {"passed": True})
    monkeypatch.setattr(flows.retrain, "load_on_candidate_server", lambda *given: loaded.append(given))
    plan = {"steps": [0.05, 0.2, 0.5], "min_users_per_step": 50, "min_hours_per_step": 2, "auto_promote": False}

    outcome = flows.retrain.retrain(candidate_server="http://gpu-box:8001/v1", candidate_share=0.25, rollout=plan,
                                    min_examples=5)

    assert outcome["status"] == "candidate"
    assert loaded == [("http://gpu-box:8001/v1", "adapter-a", "/adapters/a")]
    running = experiments.get_running(store)
    assert running.id == outcome["experiment_id"]
    assert (running.candidate_base_url, running.candidate_model) == ("http://gpu-box:8001/v1", "adapter-a")
    assert running.candidate_share == 0.05
    assert running.rollout == dict(plan, step=0)
    trail = [(e.kind, e.from_share, e.to_share) for e in experiments.list_events(store, running.id)]
    assert trail == [("start", None, 0.0), ("rollout_step", 0.0, 0.05)]
