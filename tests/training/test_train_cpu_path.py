"""The CPU training path gives the losses it gave before the CUDA path was added, and `--epochs` works.

REFERENCE was computed with the code before the change (fp32, one torch thread, the tiny random Llama
of conftest, the dataset below): padding, batch size, schedule and seeds must stay as they were. Recomputed
once since, on 2026-12-02, when the dataset's train/holdout split became by question (b5caa5d) and so the
dataset below changed: with the training code that still gave the first reference on the old dataset.
"""

import json
import math
from datetime import UTC, datetime

import pytest

from tests.training.conftest import simulated_dataset, varlen_reference
from training import varlen
from training.dataset import TRAIN_FILE, read_rows
from training.train import train_lora

pytestmark = pytest.mark.slow

REFERENCE = {
    "curve": [10.844138145446777, 10.822187423706055, 10.796049118041992, 10.81556510925293],
    "loss_base": 10.82940895199158,
    "loss_adapter": 10.799628855650907,
    "train_tokens": 1364,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return simulated_dataset(tmp_path_factory.mktemp("cpu-path"), n_queries=60, seed=1,
                             now=datetime(2026, 1, 15, tzinfo=UTC), since=datetime(2026, 1, 1, tzinfo=UTC))


@pytest.fixture
def fp32(monkeypatch):
    """fp32 whatever the CPU: the reference must not depend on whether this CPU has native bf16."""
    import torch

    monkeypatch.setattr("training.train.device_and_dtype", lambda: (torch.device("cpu"), torch.float32))


def test_cpu_losses_match_the_reference(data_dir, tiny_model_dir, tmp_path, fp32):
    run = train_lora(
        data_dir,
        tmp_path,
        base_model_dir=tiny_model_dir,
        max_steps=4,
        batch_size=2,
        lora_r=4,
        seed=0,
        learning_rate=3e-3,
    )
    curve = [point["loss"] for point in run.metrics["train_loss_curve"]]
    assert curve == pytest.approx(REFERENCE["curve"], rel=1e-4)
    assert run.metrics["holdout"]["loss_base"] == pytest.approx(REFERENCE["loss_base"], rel=1e-4)
    assert run.metrics["holdout"]["loss_adapter"] == pytest.approx(REFERENCE["loss_adapter"], rel=1e-4)
    assert run.metrics["train_tokens"] == REFERENCE["train_tokens"]  # padded batches of 2, nothing packed
    params = run.metrics["params"]
    assert (params["per_device_batch_size"], params["gradient_accumulation_steps"]) == (2, 1)
    assert params["packing"] is False and params["attention"] == "default"


def test_packed_batches_when_asked(data_dir, tiny_model_dir, tmp_path):
    # The CUDA default, asked for on CPU (SDPA: tests/training/test_packing.py shows packed rows
    # keep apart there); only the wiring is under test here.
    run = train_lora(
        data_dir, tmp_path, base_model_dir=tiny_model_dir, max_steps=2, batch_size=2, lora_r=4, packing=True
    )
    params = run.metrics["params"]
    assert params["packing"] is True and params["attention"] == "sdpa"
    assert len(run.metrics["train_loss_curve"]) == 2
    # A packed sequence holds several rows: two per step carry far more than two padded rows' tokens.
    padded_row_tokens = REFERENCE["train_tokens"] / 8  # 4 steps x 2 rows
    assert run.metrics["train_tokens"] / 2 > 2 * 2 * padded_row_tokens



def test_packed_batches_through_the_varlen_kernel(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    # The CUDA path without the flash-attn package (training.varlen); a CPU stand-in with the kernel's
    # signature and layout takes its place. Packed rows through it train as through SDPA's mask.
    calls = []

    def kernel(*args, **kwargs):
        calls.append(args[0].shape[0])
        return varlen_reference(*args, **kwargs)

    monkeypatch.setattr(varlen, "_kernel", lambda: kernel)
    options = {"base_model_dir": tiny_model_dir, "max_steps": 2, "batch_size": 2, "lora_r": 4, "packing": True}
    run = train_lora(data_dir, tmp_path / "varlen", attention=varlen.NAME, **options)
    assert run.metrics["params"]["attention"] == varlen.NAME and calls
    assert sum(calls) == run.metrics["train_tokens"] * 2  # every trained token once per layer (2 layers)
    sdpa = train_lora(data_dir, tmp_path / "sdpa", attention="sdpa", **options)
    def losses(r):
        return [p["loss"] for p in r.metrics["train_loss_curve"]]

    assert losses(run) == pytest.approx(losses(sdpa), abs=1e-4)  # measured: 2e-6 apart (summation order)
    assert run.metrics["holdout"] == pytest.approx(sdpa.metrics["holdout"], rel=1e-4)

def test_epochs_train_whole_passes(data_dir, tiny_model_dir, tmp_path):
    rows = len(read_rows(data_dir / TRAIN_FILE))
    run = train_lora(data_dir, tmp_path, base_model_dir=tiny_model_dir, epochs=1, batch_size=4, lora_r=4)
    assert [p["step"] for p in run.metrics["train_loss_curve"]] == list(range(1, math.ceil(rows / 4) + 1))
    assert run.metrics["params"]["epochs"] == 1.0 and run.metrics["params"]["max_steps"] == -1


def test_max_steps_wins_over_epochs(data_dir, tiny_model_dir, tmp_path):
    run = train_lora(data_dir, tmp_path, base_model_dir=tiny_model_dir, max_steps=2, epochs=5, batch_size=4, lora_r=4)
    assert [p["step"] for p in run.metrics["train_loss_curve"]] == [1, 2]
    assert run.metrics["params"]["max_steps"] == 2 and run.metrics["params"]["epochs"] is None


@pytest.mark.parametrize(
    ("schedule", "named"),
    [({"max_steps": 0}, "max_steps"), ({"epochs": 0}, "epochs"), ({"epochs": -1.5}, "epochs"),
     ({"batch_size": 0}, "batch_size"), ({"lora_dropout": 1.0}, "lora_dropout"),
     ({"lora_dropout": -0.1}, "lora_dropout")],
)  # fmt: skip
def test_a_schedule_that_trains_nothing_is_refused_before_anything_is_written(data_dir, tmp_path, schedule, named):
    with pytest.raises(ValueError, match=named):
        train_lora(data_dir, tmp_path / "out", base_model_dir=tmp_path / "unused", **schedule)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("torch_compile", "lora_dropout"), [(False, 0.0), (True, 0.1)])
def test_torch_compile_and_lora_dropout_reach_the_trainer(
    data_dir, tiny_model_dir, tmp_path, monkeypatch, torch_compile, lora_dropout
):
    # The wiring only (a compiled run costs a minute of compilation on CPU; docs/BENCHMARKS.md
    # "GPU training" has one, with eager's losses): the trainer is stopped as it is built.
    import trl

    class Built(Exception):
        pass

    def stop(*args, **kwargs):
        raise Built(kwargs["args"].torch_compile, kwargs["peft_config"].lora_dropout)

    monkeypatch.setattr(trl, "SFTTrainer", stop)
    with pytest.raises(Built) as built:
        train_lora(data_dir, tmp_path / "out", base_model_dir=tiny_model_dir, torch_compile=torch_compile,
                   lora_dropout=lora_dropout)  # fmt: skip
    assert built.value.args == (torch_compile, lora_dropout)
    assert list((tmp_path / "out").iterdir()) == []  # the partial adapter directory is gone


def test_bf16_on_cpu_keeps_peft_casting_the_adapter_inputs(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    # Leaving the inputs to autocast gives the same numbers under bf16 only to within a bf16 step when
    # dropout draws on them (tests/training/test_lora_inputs.py): the CPU path keeps its results.
    import torch

    class Asked(Exception):
        pass

    def record(model, *, mixed_precision):
        kinds = {(("adapter" if "lora_" in name else "base"), p.device.type, p.dtype)
                 for name, p in model.named_parameters()}  # fmt: skip
        raise Asked(mixed_precision, kinds)

    monkeypatch.setattr("training.train.device_and_dtype", lambda: (torch.device("cpu"), torch.bfloat16))
    monkeypatch.setattr("training.train.adapter_inputs_left_to_autocast", record)
    with pytest.raises(Asked) as asked:
        train_lora(data_dir, tmp_path / "out", base_model_dir=tiny_model_dir, max_steps=1)
    # The base in the dtype chosen; peft keeps the adapters' own weights in fp32.
    assert asked.value.args == (False, {("base", "cpu", torch.bfloat16), ("adapter", "cpu", torch.float32)})


def test_abloop_train_epochs_and_batch_size(data_dir, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from abloop.cli import main

    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    main(
        [
            "train",
            "--data",
            str(data_dir),
            "--out",
            str(tmp_path / "adapters"),
            "--base",
            str(tiny_model_dir),
            "--epochs",
            "0.5",
            "--batch-size",
            "8",
            "--lora-dropout",
            "0",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    rows = len(read_rows(data_dir / TRAIN_FILE))
    assert len(printed["metrics"]["train_loss_curve"]) == math.ceil(math.ceil(rows / 8) * 0.5)
    assert printed["metrics"]["params"]["epochs"] == 0.5 and printed["metrics"]["params"]["batch_size"] == 8
    assert printed["metrics"]["params"]["lora_dropout"] == 0.0


def test_the_cuda_plan_is_told_whether_the_adapters_drop_out(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    # Without dropout no adapter keeps a copy of its input: the plan counts less per token.
    import torch

    class Planned(Exception):
        pass

    def plan(base_model_dir, batch_size, lora_r, load_in_4bit, attention, adapter_dropout):
        raise Planned(adapter_dropout)

    monkeypatch.setattr("training.train.device_and_dtype", lambda: (torch.device("cuda"), torch.bfloat16))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr("training.train._cuda_step_plan", plan)
    for dropout, drops_out in ((0.05, True), (0.0, False)):
        with pytest.raises(Planned) as planned:
            train_lora(data_dir, tmp_path / f"out-{dropout}", base_model_dir=tiny_model_dir, lora_dropout=dropout)
        assert planned.value.args == (drops_out,)
