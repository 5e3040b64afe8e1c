from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from retrieval.embedder import BatchingEmbedder, EmbedderStopped


@pytest.mark.slow
def test_encode_gives_normalised_float32_rows(embedder) -> None:
    vectors = embedder.encode(["the assert statement", "list comprehensions", ""])
    assert vectors.dtype == np.float32 and vectors.shape == (3, 384) == (3, embedder.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)


@pytest.mark.slow
async def test_concurrent_embeds_share_forward_passes_and_match_encode(embedder) -> None:
    texts = [f"query number {i} about python {'lists' if i % 2 else 'dicts'}" for i in range(64)]
    batcher = BatchingEmbedder(embedder, max_batch=64)
    await batcher.start()
    try:
        vectors = await asyncio.gather(*(batcher.embed(text) for text in texts))
    finally:
        await batcher.stop()
    expected = embedder.encode(texts)
    assert all(v.shape == (384,) and v.dtype == np.float32 for v in vectors)
    assert np.allclose(np.stack(vectors), expected, atol=1e-5)
    assert batcher.items == 64
    assert batcher.batches < batcher.items


async def test_batches_never_exceed_max_batch(hash_embedder) -> None:
    batcher = BatchingEmbedder(hash_embedder, max_batch=8)
    await batcher.start()
    try:
        vectors = await asyncio.gather(*(batcher.embed(f"t{i}") for i in range(30)))
    finally:
        await batcher.stop()
    assert all(len(call) <= 8 for call in hash_embedder.calls)
    assert sum(len(call) for call in hash_embedder.calls) == 30 == batcher.items
    assert np.allclose(np.stack(vectors), hash_embedder.encode([f"t{i}" for i in range(30)]))


class _GatedEmbedder:
    """Blocks inside encode until released, and fails any batch containing 'boom'."""

    dim = 4

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[list[str]] = []

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        self.batches.append(list(texts))
        self.entered.set()
        self.release.wait(10)
        if "boom" in texts:
            raise RuntimeError("encoder exploded")
        return np.ones((len(texts), self.dim), dtype=np.float32) / 2


async def test_an_exception_fails_only_its_own_batch() -> None:
    gated = _GatedEmbedder()
    batcher = BatchingEmbedder(gated)
    await batcher.start()
    try:
        first = asyncio.ensure_future(batcher.embed("boom"))
        await asyncio.to_thread(gated.entered.wait, 10)
        # These queue up while the failing batch runs, so they form the next batch.
        rest = [asyncio.ensure_future(batcher.embed(f"ok {i}")) for i in range(5)]
        # One turn of the loop runs each new task up to its wait (asyncio runs ready tasks in order).
        await asyncio.sleep(0)
        assert batcher.queued == 5
        gated.release.set()
        with pytest.raises(RuntimeError, match="exploded"):
            await first
        results = await asyncio.gather(*rest)
        assert all(r.shape == (4,) for r in results)
        assert gated.batches == [["boom"], [f"ok {i}" for i in range(5)]]
        assert (batcher.batches, batcher.items) == (1, 5)
    finally:
        await batcher.stop()


async def test_stop_fails_pending_callers_instead_of_hanging() -> None:
    gated = _GatedEmbedder()
    batcher = BatchingEmbedder(gated)
    await batcher.start()
    in_flight = asyncio.ensure_future(batcher.embed("running"))
    await asyncio.to_thread(gated.entered.wait, 10)
    queued = [asyncio.ensure_future(batcher.embed(f"queued {i}")) for i in range(3)]
    await asyncio.sleep(0)
    assert batcher.queued == 3
    await batcher.stop()
    gated.release.set()
    for future in [in_flight, *queued]:
        with pytest.raises(EmbedderStopped):
            await future
    with pytest.raises(EmbedderStopped):
        await batcher.embed("after stop")



async def test_stop_while_a_batch_is_held_open_fails_its_callers_and_returns(hash_embedder) -> None:
    """max_wait_s holds a batch open; a text arrives in the very tick stop() cancels the worker.

    On Python 3.11, `wait_for(queue.get(), t)` returned that text instead of raising the cancellation, so the
    worker went on and stop() never returned; and the texts already taken into the open batch, no longer in
    the queue that stop() fails, left their callers waiting for ever.
    """
    batcher = BatchingEmbedder(hash_embedder, max_batch=8, max_wait_s=30.0)
    await batcher.start()
    held = asyncio.ensure_future(batcher.embed("held"))
    while batcher.queued:  # the worker takes "held" and waits for more
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)
    late = asyncio.ensure_future(batcher.embed("late"))  # runs first: puts its text, waking the worker's get
    stopping = asyncio.ensure_future(batcher.stop())  # then cancels the worker before that get resumes it
    await asyncio.wait_for(stopping, 10)
    for caller in (held, late):
        with pytest.raises(EmbedderStopped):
            await asyncio.wait_for(caller, 10)
    assert hash_embedder.calls == []

async def test_cancelled_callers_are_skipped(hash_embedder) -> None:
    gated = _GatedEmbedder()
    batcher = BatchingEmbedder(gated)
    await batcher.start()
    try:
        first = asyncio.ensure_future(batcher.embed("first"))
        await asyncio.to_thread(gated.entered.wait, 10)
        gone = asyncio.ensure_future(batcher.embed("gone"))
        kept = asyncio.ensure_future(batcher.embed("kept"))
        await asyncio.sleep(0)
        assert batcher.queued == 2
        gone.cancel()
        gated.release.set()
        await first
        assert (await kept).shape == (4,)
        assert gated.batches[-1] == ["kept"]
    finally:
        await batcher.stop()


@pytest.mark.slow
def test_encode_keeps_input_order_across_batches_and_threads(embedder) -> None:
    texts = [f"{'long ' * (i % 5)}text {i}" for i in range(10)]
    whole = embedder.encode(texts)
    assert np.allclose(embedder.encode(texts, batch_size=3), whole, atol=1e-5)
    results: dict[int, np.ndarray] = {}

    def work(n: int) -> None:
        results[n] = embedder.encode(texts, batch_size=2)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 3 and all(np.allclose(r, whole, atol=1e-5) for r in results.values())
