"""Sentence embeddings: a sync wrapper around sentence-transformers and an async micro-batcher."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)


class Embedder:
    """Encodes texts into L2-normalised float32 vectors (cosine similarity == inner product)."""

    def __init__(self, model_name_or_path: str, device: str | None = None):
        from sentence_transformers import SentenceTransformer

        self.model_name_or_path = model_name_or_path
        self.device = device or _default_device()
        self._lock = threading.Lock()
        self._model: SentenceTransformer = SentenceTransformer(model_name_or_path, device=self.device)
        dim = _embedding_dim(self._model)
        if dim is None:
            # Some models do not report a dimension; one tiny forward pass tells us.
            dim = int(self._model.encode(["dimension probe"], convert_to_numpy=True).shape[1])
        self.dim: int = dim

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Safe to call from several threads: forward passes take turns, one batch at a time."""
        return encode_in_batches(texts, batch_size, self.dim, self._forward)

    def _forward(self, texts: list[str]) -> np.ndarray:
        # The lock is per batch, not per call: a long ingestion yields between batches to
        # query embeddings from other threads instead of starving them. It also keeps the
        # fast tokenizer, which is not safe to share between threads, to one at a time.
        with self._lock:
            return self._model.encode(
                texts,
                batch_size=len(texts),
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )


def encode_in_batches(texts: list[str], batch_size: int, dim: int,
                      forward: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """`forward` over batches of similar length; rows come back in the order of `texts`."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    out = np.zeros((len(texts), dim), dtype=np.float32)
    # Longest first, as sentence-transformers does, so each batch pads to similar lengths.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        out[rows] = forward([texts[i] for i in rows])
    return out


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _embedding_dim(model: Any) -> int | None:
    # sentence-transformers renamed the getter across major versions; accept either.
    for name in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
        getter = getattr(model, name, None)
        if getter is not None:
            dim = getter()
            return int(dim) if dim else None
    return None


class EmbedderStopped(RuntimeError):
    """Raised to callers whose text was still queued when the BatchingEmbedder stopped."""


class BatchingEmbedder:
    """Lets concurrent `embed()` calls share one forward pass, and remembers recent queries.

    One worker task takes the first queued item and everything else already waiting (up to
    `max_batch`). By default there is no artificial delay: while one batch runs in the encode
    thread, new requests pile up in the queue and form the next batch, so batches grow exactly as
    fast as load does (`max_wait_s` > 0 holds a batch open that long for more). Encoding runs in a
    single dedicated thread so the event loop never blocks and the model is never called from
    two threads at once.

    Search traffic repeats itself: the last `cache_size` distinct texts keep their vectors (an
    exact-match LRU; 0 turns it off), and a text queued twice in one batch is encoded once.
    """

    def __init__(self, embedder: Any, max_batch: int = 64, *, cache_size: int = 0, max_wait_s: float = 0.0):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if cache_size < 0 or max_wait_s < 0:
            raise ValueError("cache_size and max_wait_s must be >= 0")
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.cache_size = cache_size
        self.batches = 0
        self.items = 0
        self.cache_hits = 0
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[np.ndarray]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    @property
    def queued(self) -> int:
        """Texts waiting for the next batch (not counting the batch being embedded)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        if self.running:
            return
        self._queue = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._worker = asyncio.create_task(self._run(), name="batching-embedder")

    async def stop(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._fail_pending(EmbedderStopped("embedder stopped before this text was embedded"))
        if self._executor is not None:
            # The in-flight batch (if any) was already failed by the worker's cancellation path.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def embed(self, text: str) -> np.ndarray:
        if not self.running or self._queue is None:
            raise EmbedderStopped("BatchingEmbedder is not running; call start() first")
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            self.cache_hits += 1
            return cached.copy()  # callers may write to theirs
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((text, future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._take_batch()
            # Callers that gave up (cancelled) need no forward pass.
            batch = [(text, fut) for text, fut in batch if not fut.done()]
            if not batch:
                continue
            texts = list(dict.fromkeys(text for text, _ in batch))
            try:
                vectors = await loop.run_in_executor(self._executor, self.embedder.encode, texts)
                if len(vectors) != len(texts):
                    raise RuntimeError(f"encoder returned {len(vectors)} vectors for {len(texts)} texts")
            except asyncio.CancelledError:
                _fail(batch, EmbedderStopped("embedder stopped while this text was being embedded"))
                raise
            except Exception as exc:
                # One bad batch fails only its own callers; the worker carries on.
                log.warning("embedding batch of %d texts failed: %s", len(batch), exc)
                _fail(batch, exc)
                continue
            self.batches += 1
            self.items += len(batch)
            by_text = dict(zip(texts, vectors, strict=True))
            for text, fut in batch:
                if not fut.done():
                    # A copy, so one caller's vector does not pin (or alias) the whole batch array.
                    fut.set_result(by_text[text].copy())
            self._remember(by_text)

    async def _take_batch(self) -> list[tuple[str, asyncio.Future[np.ndarray]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        try:
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                # asyncio.timeout, not wait_for: on Python 3.11 a wait_for whose get() completes in the tick
                # stop() cancels this task swallows the cancellation, and stop() then waited for ever.
                try:
                    async with asyncio.timeout(remaining):
                        batch.append(await self._queue.get())
                except TimeoutError:
                    break
        except asyncio.CancelledError:
            # Stopped while holding a batch open (max_wait_s): its texts have left the queue that stop() fails.
            _fail(batch, EmbedderStopped("embedder stopped before this text was embedded"))
            raise
        return batch

    def _remember(self, by_text: dict[str, np.ndarray]) -> None:
        if not self.cache_size:
            return
        for text, vector in by_text.items():
            self._cache[text] = vector.copy()  # its own row, not a view pinning the batch
            self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _fail_pending(self, exc: Exception) -> None:
        if self._queue is None:
            return
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(exc)


def _fail(batch: list[tuple[str, asyncio.Future[np.ndarray]]], exc: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)
