"""Training fixtures: a migrated SQLite store, an event factory, a cheap deterministic encoder and
two models — a tiny randomly initialised Llama with the SmolLM2 tokenizer, and SmolLM2-135M itself."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from store.db import Database
from store.models import Feedback, SearchEvent, new_id

SYSTEM = "You are a search assistant. Answer the question using only the numbered context passages."
_WORD = re.compile(r"\w+")


def simulated_dataset(folder: Path, *, n_queries: int, seed: int, now: datetime | None = None,
                      since: datetime | None = None) -> Path:
    """Training data as the retrain flow builds it, from simulated traffic in a store of its own under `folder`."""
    from abloop.simulate import simulate_traffic
    from training.dataset import build_dataset

    db = Database(f"sqlite:///{folder / 'store.db'}")
    db.migrate()
    simulate_traffic(db, n_queries=n_queries, seed=seed, **({"now": now} if now else {}))
    out = folder / "data"
    build_dataset(db, out, embedder=BagOfWordsEncoder(), holdout_fraction=0.2, **({"since": since} if since else {}))
    db.dispose()
    return out


class BagOfWordsEncoder:
    """Hashed bag of words, L2-normalised: same words => cosine 1, disjoint words => 0. Instant."""

    def __init__(self, dim: int = 512):
        self.dim = dim

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                out[row, int(hashlib.md5(word.encode()).hexdigest()[:8], 16) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1.0, norms)


@pytest.fixture(scope="module", autouse=True)
def _same_torch_threads():
    """One intra-op thread unless ABLOOP_TEST_TORCH_THREADS says otherwise (in place of tests/conftest.py's
    fixture of the same name, for the training tests).

    Test machines are shared: with more runnable threads than cores, OpenMP's spinning workers
    make a 2-thread forward pass several times slower than a 1-thread one.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("ABLOOP_TEST_TORCH_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture
def encoder() -> BagOfWordsEncoder:
    return BagOfWordsEncoder()


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'store.db'}")
    database.migrate()
    yield database
    database.dispose()


def messages_for(question: str, context: str = "Python lists have a sort() method.") -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Context:\n[1] Lists\n{context}\n\nQuestion: {question}"},
    ]


AddEvent = Callable[..., str]


@pytest.fixture
def add_event(db: Database) -> AddEvent:
    """Insert one search event and its feedback rows (dicts of Feedback columns); return the event id."""
    base_ts = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)

    def _add(
        question: str,
        answer: str | None,
        *feedback: dict[str, Any],
        messages: list[dict[str, Any]] | None = None,
        ts: datetime | None = None,
        user_id: str = "u1",
        retrieved_ids: list[str] | None = None,
    ) -> str:
        event_id = new_id()
        event_ts = ts or base_ts
        with db.session() as session:
            session.add(
                SearchEvent(
                    id=event_id,
                    ts=event_ts,
                    user_id=user_id,
                    arm="control",
                    served_arm="control",
                    model="m",
                    query=question,
                    messages=messages if messages is not None else messages_for(question),
                    retrieved={"ids": retrieved_ids or [], "scores": [], "index_version": "v"},
                    answer=answer,
                    status="ok",
                )
            )
            session.flush()
            for n, fields in enumerate(feedback):
                session.add(Feedback(event_id=event_id, ts=event_ts + timedelta(minutes=n + 1), **fields))
        return event_id

    return _add


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors HF directory (converted from the wheel's GGUF once)."""
    from serving.model import resolve_base_model

    return resolve_base_model()


@pytest.fixture(scope="session")
def tiny_model_dir(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama (hidden 64) that speaks the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


# Stand-ins for torch.nn.attention.varlen.varlen_attn (training.varlen), whose kernel runs on CUDA only.


def varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """torch.nn.attention.varlen.varlen_attn as torch 2.11 declares it (no enable_gqa), row by row through SDPA."""
    import torch

    # What the CUDA kernel needs besides the queries' boundaries: the keys' (the same rows here) and
    # the longest row of each, as ints.
    longest = int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    if not torch.equal(cu_seq_k, cu_seq_q) or (max_q, max_k) != (longest, longest) or type(max_q) is not int:
        raise ValueError(f"boundaries {cu_seq_q}, {cu_seq_k}, longest rows {max_q!r}, {max_k!r}")
    out = torch.empty_like(query)
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), strict=True):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # [heads, tokens, dim]
        causal = tuple(window_size) == (-1, 0)
        # Without enable_gqa SDPA refuses fewer key heads than query heads, as the CUDA kernel does.
        rows = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        out[start:end] = rows.transpose(0, 1)
    return out


def varlen_reference_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                          enable_gqa=False):  # fmt: skip
    """The same as torch 2.13 declares it: grouped key and value heads only when asked."""
    if not enable_gqa and key.shape[1] != query.shape[1]:
        raise RuntimeError("key heads != query heads without enable_gqa")
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size)
