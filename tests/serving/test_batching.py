"""Concurrent requests share forward passes; a full queue is refused, not grown."""

from __future__ import annotations

import asyncio

import httpx
import pytest

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Name a primary color.",
    "Write a haiku about rain.",
    "What is 3 times 4?",
    "Say hello in Spanish.",
    "What is Python?",
    "Name a planet.",
    "Why is the sky blue?",
]


def _body(model: str, prompt: str, max_tokens: int = 10) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def _ids(engine, prompt: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": prompt}])


def _greedy(max_tokens: int, *, exactly: bool = False):
    """Greedy decoding; `exactly` ignores EOS, so the request really runs `max_tokens` steps."""
    from serving.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=exactly)


@pytest.fixture
def own_engine(loaded_model):
    """A fresh engine on a private copy of the weights: its counters start at zero and nothing else uses it."""
    from serving.engine import Engine
    from serving.model import load_base_model

    def make(dtype: str = "auto", **kwargs):
        engine = Engine(load_base_model(str(loaded_model.path), dtype=dtype), **kwargs)
        engine.start()
        made.append(engine)
        return engine

    made = []
    yield make
    for engine in made:
        engine.stop()


async def test_concurrent_requests_are_batched_and_match_unbatched(own_engine):
    # fp32: greedy tokens are the same whatever else is in the batch only up to rounding, and bf16's rounding
    # (the default on CPUs with native bf16) is coarse enough that left padding flipped a token in 1 of 10 runs.
    engine = own_engine(dtype="float32", max_batch=16)
    sequential = [(await engine.submit(_ids(engine, p), _greedy(10)).result()).text for p in PROMPTS[:4]]
    assert engine.stats.max_rows == 1  # one at a time so far

    # Submitted back to back without yielding: all eight are queued while the first forward runs,
    # so they share forward passes whatever the machine's load.
    handles = [engine.submit(_ids(engine, p), _greedy(10)) for p in PROMPTS]
    texts = [(await h.result()).text for h in handles]

    assert all(t.strip() for t in texts)
    assert engine.stats.requests == 12 and engine.stats.completed == 12
    assert engine.stats.max_rows > 1  # what the engine ran, not which request returned first
    assert engine.stats.prefill_batches < 12
    # greedy answers do not depend on what else was in the batch
    assert texts[:4] == sequential


async def test_short_requests_do_not_wait_for_long_ones(engine):
    # 48 tokens: the short row joins the batch at the long one's next step and is done 2 steps later.
    long = engine.submit(_ids(engine, "Write a long story about a dragon."), _greedy(48, exactly=True))
    short = engine.submit(_ids(engine, "Name a color."), _greedy(2))
    await short.result()
    # The long row is still generating when the short one has its answer: rows finish on their own.
    assert not long.done
    assert (await long.result()).completion_tokens > 2


async def test_full_queue_is_refused_not_grown(own_engine):
    from serving.errors import QueueFull

    engine = own_engine(max_batch=1, max_queue=1)
    accepted, refused = [], 0
    for prompt in PROMPTS[:3]:  # back to back: one runs (200 tokens), one waits, the queue is full
        try:
            accepted.append(engine.submit(_ids(engine, prompt), _greedy(200, exactly=True)))
        except QueueFull:
            refused += 1
    assert refused >= 1 and len(accepted) >= 1
    assert engine.stats.rejected == refused
    for handle in accepted:
        handle.cancel()
    assert engine.stats.max_rows <= 1  # batching off really is off


async def test_full_queue_is_503_with_retry_after(own_engine):
    from serving.app import create_app
    from serving.server import ServerThread

    engine = own_engine(max_batch=1, max_queue=1)
    running = engine.submit(_ids(engine, PROMPTS[0]), _greedy(400, exactly=True))
    for _ in range(3000):  # until the worker has taken it from the queue (by the engine's state, not a sleep)
        if engine.active_rows:
            break
        await asyncio.sleep(0.01)
    waiting = engine.submit(_ids(engine, PROMPTS[1]), _greedy(400, exactly=True))  # the queue is now full
    try:
        with ServerThread(create_app(engine)) as srv:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=300) as client:
                r = await client.post("/chat/completions", json=_body(engine.name, PROMPTS[2], 8))
    finally:
        running.cancel()
        waiting.cancel()
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["code"] == "queue_full" and err["type"] == "server_error"
