"""LoRA training, naming, offline evaluation and export on a tiny random Llama (seconds on CPU)."""

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from abloop.simulate import simulate_traffic
from store.db import Database
from tests.training.conftest import BagOfWordsEncoder
from training.dataset import HOLDOUT_FILE, build_dataset, read_rows
from training.evaluate import EVAL_FILE, METRICS_FILE, encode_pair, load_tokenizer, rouge_l
from training.registry import AdapterNameTaken, adapter_name, get_adapter, register_adapter
from training.train import dataset_hash, train_lora


@pytest.fixture(scope="module")
def module_db(tmp_path_factory) -> Database:
    database = Database(f"sqlite:///{tmp_path_factory.mktemp('db') / 'store.db'}")
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture(scope="module")
def data_dir(module_db, tmp_path_factory) -> Path:
    simulate_traffic(module_db, n_queries=60, seed=1)
    out = tmp_path_factory.mktemp("data")
    build_dataset(module_db, out, embedder=BagOfWordsEncoder(), holdout_fraction=0.2)
    return out


@pytest.fixture(scope="module")
def tiny_run(data_dir, tiny_model_dir, module_db, tmp_path_factory):
    return train_lora(
        data_dir,
        tmp_path_factory.mktemp("adapters"),
        base_model_dir=tiny_model_dir,
        max_steps=3,
        batch_size=2,
        lora_r=4,
        db=module_db,
    )


@pytest.mark.slow
def test_train_saves_a_versioned_adapter_with_metrics(tiny_run, data_dir, module_db, tiny_model_dir):
    # Named after the base it was trained on (an HF directory here), not after the default model.
    assert re.fullmatch(re.escape(tiny_model_dir.name) + r"-\d{8}T\d{6}Z-[0-9a-f]{8}", tiny_run.name)
    assert tiny_run.name.endswith(dataset_hash(data_dir)[:8])
    assert tiny_run.adapter_dir.name == tiny_run.name
    assert (tiny_run.adapter_dir / "adapter_config.json").is_file()
    assert (tiny_run.adapter_dir / "adapter_model.safetensors").is_file()
    assert not list(tiny_run.adapter_dir.parent.glob(".*.partial"))
    metrics = json.loads((tiny_run.adapter_dir / METRICS_FILE).read_text())
    assert [p["step"] for p in metrics["train_loss_curve"]] == [1, 2, 3]
    for key in ("loss_base", "loss_adapter", "perplexity_base", "perplexity_adapter"):
        assert metrics["holdout"][key] > 0
    assert metrics["tokens_per_s"] > 0 and metrics["peak_memory_mb"] > 0 and metrics["wall_time_s"] > 0
    assert metrics["params"]["device"] == "cpu" and metrics["params"]["dtype"] == _cpu_dtype()
    row = get_adapter(module_db, tiny_run.name)
    assert row is not None and row.id == tiny_run.adapter_id and row.base_model == tiny_model_dir.name
    assert row.dataset_hash == dataset_hash(data_dir) and row.train_metrics["name"] == tiny_run.name


@pytest.mark.slow
def test_evaluate_records_the_verdict(tiny_run, data_dir, tiny_model_dir, module_db):
    from training.evaluate import evaluate_adapter

    report = evaluate_adapter(
        data_dir,
        tiny_run.adapter_dir,
        base_model_dir=tiny_model_dir,
        max_new_tokens=8,
        max_answers=4,
        db=module_db,
        embedder=BagOfWordsEncoder(),
    )
    holdout = read_rows(data_dir / HOLDOUT_FILE)
    assert report.holdout["n"] == len(holdout)
    assert report.answers["n"] == 4
    # The figures the gate read, computed here another way: one unpadded row at a time, plain forward.
    loss_base = _completion_loss_by_hand(tiny_model_dir, None, holdout)
    loss_adapter = _completion_loss_by_hand(tiny_model_dir, tiny_run.adapter_dir, holdout)
    # (padding and batching move the figures by about 1e-6 relative; a label off by one token moves them more)
    assert report.holdout["loss_base"] == pytest.approx(loss_base, rel=1e-4)
    assert report.holdout["loss_adapter"] == pytest.approx(loss_adapter, rel=1e-4)
    # ...and the verdict those figures call for under the report's thresholds.
    improved = (loss_base - loss_adapter) / loss_base >= report.thresholds["min_loss_improvement"]
    tolerance = report.thresholds["answer_tolerance"]
    answers_held = all(report.answers[f"{m}_adapter"] >= report.answers[f"{m}_base"] - tolerance
                       for m in ("rouge_l", "similarity"))
    assert report.passed == (improved and answers_held)
    on_disk = json.loads((tiny_run.adapter_dir / EVAL_FILE).read_text())
    assert on_disk == report.to_dict()
    assert get_adapter(module_db, tiny_run.name).eval_metrics["passed"] == report.passed


@pytest.mark.slow
def test_gate_fails_when_the_required_improvement_is_out_of_reach(tiny_run, data_dir, tiny_model_dir):
    from training.evaluate import evaluate_adapter

    report = evaluate_adapter(
        data_dir,
        tiny_run.adapter_dir,
        base_model_dir=tiny_model_dir,
        min_loss_improvement=0.99,
        max_new_tokens=4,
        max_answers=2,
        embedder=BagOfWordsEncoder(),
    )
    assert not report.passed
    assert any("holdout loss" in reason for reason in report.reasons)


@pytest.mark.slow
def test_export_merges_into_an_equivalent_plain_model(tiny_run, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.export import export_merged

    out = export_merged(tiny_run.adapter_dir, tmp_path / "merged", base_model_dir=tiny_model_dir)
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert not (out / "adapter_config.json").exists()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), tiny_run.adapter_dir)
    ids = torch.tensor([[1, 42, 314, 2718]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-4)
    with pytest.raises(FileExistsError):
        export_merged(tiny_run.adapter_dir, out, base_model_dir=tiny_model_dir)


def test_adapter_names_are_never_reused(data_dir, tmp_path, module_db, monkeypatch):
    monkeypatch.setattr("training.train.adapter_name", lambda base, data_hash: "fixed-name")
    (tmp_path / "fixed-name").mkdir()
    with pytest.raises(AdapterNameTaken):
        train_lora(data_dir, tmp_path, base_model_dir=tmp_path / "unused")
    register_adapter(module_db, name="fixed-name", base_model="b", path=tmp_path, dataset_hash=None, train_metrics=None)
    with pytest.raises(AdapterNameTaken):
        train_lora(data_dir, tmp_path / "elsewhere", base_model_dir=tmp_path / "unused", db=module_db)
    with pytest.raises(AdapterNameTaken):
        register_adapter(
            module_db, name="fixed-name", base_model="b", path=tmp_path, dataset_hash=None, train_metrics=None
        )


def test_the_dataset_hash_is_the_cards_else_the_split_files_with_their_names(tmp_path):
    import hashlib

    from training.dataset import HOLDOUT_FILE, TRAIN_FILE

    (tmp_path / TRAIN_FILE).write_text('{"prompt": "p", "completion": "c"}\n')
    alone = hashlib.sha256(TRAIN_FILE.encode() + b"\x00" + (tmp_path / TRAIN_FILE).read_bytes()).hexdigest()
    assert dataset_hash(tmp_path) == alone  # no holdout file, no card
    (tmp_path / HOLDOUT_FILE).write_text('{"prompt": "q", "completion": "d"}\n')
    both = hashlib.sha256()
    for name in (TRAIN_FILE, HOLDOUT_FILE):
        both.update(name.encode() + b"\x00" + (tmp_path / name).read_bytes())
    assert dataset_hash(str(tmp_path)) == both.hexdigest() != alone
    (tmp_path / HOLDOUT_FILE).write_text('{"prompt": "q", "completion": "e"}\n')
    assert dataset_hash(tmp_path) != both.hexdigest()  # any changed row changes it


def test_the_schedule_is_steps_or_epochs_and_says_which_wins(caplog):
    from training.train import DEFAULT_MAX_STEPS, _schedule

    assert _schedule(None, None) == {"max_steps": DEFAULT_MAX_STEPS}
    assert _schedule(None, 2) == {"max_steps": -1, "num_train_epochs": 2.0}
    with caplog.at_level("WARNING", logger="training.train"):
        assert _schedule(7, 0.5) == {"max_steps": 7}
    assert [r.getMessage() for r in caplog.records] == ["both max_steps (7) and epochs (0.5) given: max_steps wins"]


def test_adapter_name_format():
    when = datetime(2026, 5, 17, 8, 9, 10, tzinfo=UTC)
    assert adapter_name("SmolLM2-135M-Instruct", "abcdef0123456789", when) == (
        "SmolLM2-135M-Instruct-20260517T080910Z-abcdef01"
    )
    # The model server refuses "." (peft cannot hold it) and names over 128 characters: the retrained
    # adapter of a "Qwen2.5-..." base could never be loaded.
    assert adapter_name("Qwen2.5-0.5B-Instruct", "abcdef0123456789", when) == (
        "Qwen2_5-0_5B-Instruct-20260517T080910Z-abcdef01"
    )
    long = adapter_name("m" * 200, "abcdef0123456789", when)
    assert len(long) == 128 and long.endswith("m-20260517T080910Z-abcdef01")


def test_trained_adapter_names_are_names_the_model_server_takes():
    """training restates the server's rule (it may not import serving): the two must agree."""
    from serving import schemas
    from serving.adapters import _check_name
    from training import registry

    assert (registry._SERVABLE_CHARS, registry._SERVABLE_MAX_LENGTH) == (schemas.ADAPTER_NAME_CHARS,
                                                                        schemas.ADAPTER_NAME_MAX_LENGTH)
    when = datetime(2026, 5, 17, 8, 9, 10, tzinfo=UTC)
    for base in ("Qwen2.5-0.5B-Instruct", "m" * 200, "base model (v2)/ü", "SmolLM2-135M-Instruct"):
        _check_name(adapter_name(base, "abcdef0123456789", when))  # raises BadAdapter if refused


@pytest.mark.slow
def test_4bit_needs_cuda_and_leaves_nothing_behind(data_dir, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError) as refused:
        train_lora(data_dir, tmp_path, base_model_dir=tiny_model_dir, load_in_4bit=True)
    assert str(refused.value) == "load_in_4bit needs a CUDA GPU; on CPU train the unquantised base instead"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_on_cuda_the_base_is_loaded_on_the_gpu_in_bf16_as_planned(data_dir, tiny_model_dir, tmp_path, monkeypatch,
                                                                   load_in_4bit):  # fmt: skip
    import torch

    from training import varlen
    from training.batching import BatchPlan

    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        raise Loaded(args, kwargs)

    monkeypatch.setattr("training.train.device_and_dtype", lambda: (torch.device("cuda"), torch.bfloat16))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(varlen, "available", lambda: False)  # nor FlashAttention here: packed rows go to SDPA
    monkeypatch.setattr("training.train._cuda_step_plan", lambda *args, **kwargs: BatchPlan(2, 2, True))
    monkeypatch.setattr("training.train.load_quantised_base", load)
    monkeypatch.setattr("training.train.load_causal_lm", load)
    with pytest.raises(Loaded) as loaded:
        train_lora(data_dir, tmp_path / "out", base_model_dir=tiny_model_dir, load_in_4bit=load_in_4bit)
    if load_in_4bit:  # on the first GPU, recomputing activations as the plan says
        asked = ((tiny_model_dir, torch.bfloat16), {"device_map": {"": 0}, "checkpointing": True})
    else:
        asked = ((tiny_model_dir,), {"device": torch.device("cuda"), "dtype": torch.bfloat16})
    assert loaded.value.args == (asked[0], {**asked[1], "attn_implementation": "sdpa"})


@pytest.mark.slow
def test_completion_tokens_are_exactly_the_answer_and_end_of_turn(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]
    ids, start = encode_pair(tokenizer, prompt, [{"role": "assistant", "content": "Answer: yes"}])
    assert tokenizer.decode(ids[start:]) == "Answer: yes<|im_end|>\n"
    assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")


def test_rouge_l():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("dog", "the cat") == 0.0
    # LCS "the cat" (2): precision 2/3, recall 2/2.
    assert rouge_l("the black cat", "The cat!") == pytest.approx(0.8)


def _cpu_dtype() -> str:
    """What training picks on this CPU: bf16 where it is native, fp32 elsewhere."""
    from store.runtime import cpu_has_native_bf16

    return "bfloat16" if cpu_has_native_bf16() else "float32"


def _completion_loss_by_hand(base_dir: Path, adapter_dir: Path | None, rows: list[dict]) -> float:
    """Mean NLL per completion token, each row alone (no padding), in the dtype the gate uses."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from store.runtime import choose_device_dtype
    from training.evaluate import encode_pair, load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=choose_device_dtype("cpu")[1])
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    tokenizer = load_tokenizer(base_dir)
    total, count = 0.0, 0
    with torch.inference_mode():
        for row in rows:
            ids, start = encode_pair(tokenizer, row["prompt"], row["completion"])
            logits = model(input_ids=torch.tensor([ids])).logits[0, start - 1 : -1].float()
            total += F.cross_entropy(logits, torch.tensor(ids[start:]), reduction="sum").item()
            count += len(ids) - start
    return total / count


def _card(log_history, train_output, *, holdout=(2.0, 1.5, 40), on_cuda=False, peak_before_mb=0.0):
    from training.train import _metrics

    return _metrics(log_history, train_output, name="n-v1", base_name="base", base_model_dir=Path("/m"),
                    data_dir=Path("/d"), data_hash="h", rows=(30, 4), holdout=holdout, params={"lr": 1},
                    on_cuda=on_cuda, peak_before_mb=peak_before_mb, wall_time_s=12.345)


def test_the_metrics_card_from_trainer_logs(monkeypatch):
    """The adapter card's figures from the trainer's log history, without training: the loss curve keeps
    only logged losses with a step, tokens are the largest count seen, rates round as shown."""
    import math

    import training.train

    monkeypatch.setattr(training.train, "_lifetime_peak_rss_mb", lambda: 812.34)
    history = [{"loss": 3.0, "step": 1, "num_tokens": 100}, {"learning_rate": 1e-4, "step": 1},
               {"loss": 2.5, "step": 2, "num_tokens": 250}, {"loss": 9.9}, {"train_runtime": 5, "num_tokens": 240}]
    card = _card(history, {"train_runtime": 4.567})
    assert card["train_loss_curve"] == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]
    assert card["train_loss_final"] == 2.5
    assert (card["train_tokens"], card["train_runtime_s"], card["tokens_per_s"]) == (250, 4.57, 54.7)
    assert card["holdout"] == {"tokens": 40, "loss_base": 2.0, "loss_adapter": 1.5,
                               "perplexity_base": math.exp(2.0), "perplexity_adapter": math.exp(1.5)}
    assert (card["peak_memory_mb"], card["peak_memory_kind"], card["wall_time_s"]) == (812.3, "rss", 12.35)
    assert {key: card[key] for key in ("name", "base_model", "base_model_dir", "data_dir", "dataset_hash",
                                       "train_rows", "holdout_rows", "params")} == {
        "name": "n-v1", "base_model": "base", "base_model_dir": "/m", "data_dir": "/d", "dataset_hash": "h",
        "train_rows": 30, "holdout_rows": 4, "params": {"lr": 1}}
    assert set(card["versions"]) == {"torch", "transformers", "peft", "trl"}

    # An earlier stage of the process peaked as high or higher: training's own peak is only bounded by it.
    for before in (812.34, 900.0):
        assert _card(history, {}, peak_before_mb=before)["peak_memory_kind"] == "rss_process_lifetime"
    assert _card([{"loss": 1.0, "step": 1}], {})["train_tokens"] == 0  # a trainer that counts no tokens
    empty = _card([], {}, holdout=(None, None, 0))
    assert (empty["train_loss_curve"], empty["train_loss_final"], empty["train_tokens"]) == ([], None, 0)
    assert (empty["train_runtime_s"], empty["tokens_per_s"]) == (0.0, None)  # no rate from no time
    assert empty["holdout"]["perplexity_base"] is None and empty["holdout"]["perplexity_adapter"] is None


def test_the_metrics_card_on_cuda_reads_the_allocator_peak(monkeypatch):
    import torch

    import training.train

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30 + 2**19)
    monkeypatch.setattr(training.train, "_lifetime_peak_rss_mb", lambda: pytest.fail("RSS read on CUDA"))
    card = _card([{"loss": 1.0, "step": 1, "num_tokens": 10}], {"train_runtime": 0.3}, on_cuda=True)
    assert (card["peak_memory_mb"], card["peak_memory_kind"]) == (3072.5, "cuda_max_allocated")
    assert card["tokens_per_s"] == 33.3


def test_4bit_is_possible_with_cuda_and_bitsandbytes_only(monkeypatch):
    import importlib.util

    import torch

    from training.train import check_4bit_possible

    found = {"bitsandbytes": object()}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: found.get(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_4bit_possible()
    found.clear()
    with pytest.raises(ImportError, match=r"^load_in_4bit needs bitsandbytes: pip install 'abloop\[gpu\]'$"):
        check_4bit_possible()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="^load_in_4bit needs a CUDA GPU"):
        check_4bit_possible()
