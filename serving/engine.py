"""The batching generation engine: the request queue, the worker thread and its batched step loop.

One worker thread owns the model.  Requests are queued (bounded: a full queue is refused, never grown)
and the worker runs a step loop with a KV cache over a batch of rows:

* **continuous batching** - waiting requests join the running batch between decode steps (their prompts
  are prefilled as one left-padded group, then the KV caches are left-padded to a common length and
  concatenated), up to ``max_batch`` rows;
* **per-row finishing** - each row stops on its own ``max_tokens``, stop strings or EOS, is answered at
  once and is dropped from the batch (and its KV cache), so short requests never wait for long ones;
* **per-row sampling** - greedy when ``temperature == 0``, else temperature + top-p with the row's own
  ``torch.Generator`` (seeded by ``seed``), so rows with different sampling settings share a batch;
* **mixed adapters** - once an adapter is loaded the model is a ``PeftModel`` and every forward passes
  peft's per-row ``adapter_names`` (``"__base__"`` for the base model), so base and adapter rows share
  a batch.

Adapter loads and unloads run on the same worker thread between steps, so they never race a forward
(the registry itself is :mod:`serving.adapters`; per-row sampling and stop strings are
:mod:`serving.sampling`; the errors are :mod:`serving.errors`).

``max_batch=1`` switches batching off (one request at a time), for comparison.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

# The errors, SamplingParams and BASE_ADAPTER used to live here; callers import them from here (see __all__).
from serving.adapters import BASE_ADAPTER, _AdapterOp, _AdapterRegistry
from serving.errors import (
    AdapterExists,
    BadAdapter,
    EngineError,
    EngineStopped,
    GenerationFailed,
    ModelNotFound,
    PromptTooLong,
    QueueFull,
)
from serving.model import LoadedModel
from serving.sampling import SamplingParams, _cut_at_stop, _new_generator, _sample, _streamable
from serving.sampling import _held_back as _held_back  # tests/serving/test_units.py imports it from here

__all__ = [
    "BASE_ADAPTER",
    "AdapterExists",
    "BadAdapter",
    "Completion",
    "Engine",
    "EngineError",
    "EngineStats",
    "EngineStopped",
    "GenerationFailed",
    "ModelNotFound",
    "PromptTooLong",
    "QueueFull",
    "RequestHandle",
    "SamplingParams",
]

log = logging.getLogger(__name__)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class EngineStats:
    requests: int = 0  # admitted into a batch
    completed: int = 0
    rejected: int = 0  # refused because the queue was full
    prefill_batches: int = 0  # forward calls that started new requests (one per admitted group)
    decode_steps: int = 0
    generated_tokens: int = 0
    max_rows: int = 0  # the largest batch a forward call ran

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class RequestHandle:
    """A submitted request: iterate :meth:`deltas` for streaming, or await :meth:`result`."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams, adapter: str | None):
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.params = params
        self.adapter = adapter  # None = base model
        self.cancelled = False
        self.done = False
        self.completion: Completion | None = None
        self.submitted_at = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    # -- called from the worker thread -------------------------------------------------------
    def _emit(self, kind: str, payload: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    # -- called from the event loop ----------------------------------------------------------
    def cancel(self) -> None:
        if not self.done:
            self.cancelled = True
            self.engine._wake()

    async def deltas(self) -> AsyncIterator[str]:
        """Text pieces as they are produced; afterwards :attr:`completion` holds the totals."""
        while True:
            kind, payload = await self._events.get()
            if kind == "delta":
                yield payload
            elif kind == "done":
                self.done = True
                self.completion = payload
                return
            else:  # "error"
                self.done = True
                raise payload

    async def result(self) -> Completion:
        try:
            async for _ in self.deltas():
                pass
        except asyncio.CancelledError:
            self.cancel()
            raise
        assert self.completion is not None
        return self.completion


class _Row:
    """One request inside the running batch (worker thread only)."""

    __slots__ = ("handle", "generated", "sent", "next_token", "generator", "adapter_key", "text")

    def __init__(self, handle: RequestHandle, device: torch.device):
        self.handle = handle
        self.generated: list[int] = []
        self.sent = 0  # characters of text already streamed
        self.text = ""
        self.next_token: int | None = None  # sampled but not yet fed to the model
        self.adapter_key = handle.adapter or BASE_ADAPTER
        self.generator = _new_generator(handle.params, device)


class _Batch:
    """The running batch: rows, the shared KV cache, the 2-D attention mask and next positions."""

    def __init__(self, rows: list[_Row], cache: Any, mask: torch.Tensor, positions: torch.Tensor):
        self.rows = rows
        self.cache = cache
        self.mask = mask  # [B, L] long, 0 = padding
        self.positions = positions  # [B] position id of the next fed token


class Engine(_AdapterRegistry):
    """Owns a loaded base model; serves chat completions for it and its LoRA adapters."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch: int = 16,
        max_queue: int = 256,
        default_max_tokens: int = 256,
    ):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.device = loaded.device
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.default_max_tokens = default_max_tokens
        self.max_context = loaded.max_context
        self.stats = EngineStats()
        self.created = int(time.time())

        eos: set[int] = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, (list, tuple)):
                eos.update(int(v) for v in value)
        self.eos_ids = eos
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(eos or {0})

        self._init_registry()  # adapters: see serving.adapters
        self._pending: deque[RequestHandle] = deque()
        self._ops: list[_AdapterOp] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._batch: _Batch | None = None
        self._can_join = True  # False when the cache type cannot be merged (then batches run to the end)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._worker, name="serving-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ requests
    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> RequestHandle:
        """Queue a request (call from the event loop); raises :class:`QueueFull` instead of growing."""
        if not prompt_ids:
            raise EngineError("the prompt is empty", param="messages")
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise PromptTooLong(
                f"The prompt has {len(prompt_ids)} tokens; this model's context is {self.max_context} tokens.",
                param="messages",
            )
        params.max_tokens = max(1, min(params.max_tokens, room))
        handle = RequestHandle(self, prompt_ids, params, adapter)
        with self._cond:
            if self._stopping or not self.running:
                raise EngineStopped("the engine is not running")
            if adapter is not None and adapter not in self._adapters:
                raise ModelNotFound(f"The model `{adapter}` does not exist.", param="model")
            if len(self._pending) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(
                    f"The server is busy ({len(self._pending)} requests waiting); retry shortly."
                )
            self._pending.append(handle)
            self._cond.notify_all()
        return handle

    @property
    def active_rows(self) -> int:
        batch = self._batch
        return len(batch.rows) if batch is not None else 0

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._pending)

    # ------------------------------------------------------------------ worker thread
    def _worker(self) -> None:
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException:  # pragma: no cover - a bug; fail every waiting request loudly
            log.exception("serving engine worker crashed")
            self._fail_all(GenerationFailed("the generation worker crashed"))
            raise

    def _loop(self) -> None:
        while True:
            with self._cond:
                while (
                    not self._stopping
                    and not self._ops
                    and self._batch is None
                    and not self._pending
                ):
                    self._cond.wait()
                if self._stopping:
                    break
                ops, self._ops = self._ops, []
            # Adapter changes first, while every request that might use them is still visible
            # (queued or in the batch): an unload waits for those.
            self._run_ops(ops)
            self._drop_cancelled()
            admitted: list[RequestHandle] = []
            with self._cond:
                active = len(self._batch.rows) if self._batch else 0
                if self._batch is None or self._can_join:
                    while self._pending and active + len(admitted) < self.max_batch:
                        h = self._pending.popleft()
                        if not h.cancelled:
                            admitted.append(h)
            try:
                if admitted:
                    self.stats.requests += len(admitted)
                    self._prefill(admitted)
                elif self._batch is not None:
                    self._decode_step()
            except Exception as exc:  # noqa: BLE001 - answer the requests instead of dying
                log.exception("generation failed")
                err = GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}")
                rows = (self._batch.rows if self._batch else []) + [
                    _Row(h, self.device) for h in admitted if not h.done
                ]
                self._batch = None
                for row in rows:
                    if not row.handle.done:
                        row.handle.done = True
                        row.handle._emit("error", err)
        self._fail_all(EngineStopped("the server is shutting down"))

    def _fail_all(self, err: EngineError) -> None:
        with self._cond:
            pending, self._pending = list(self._pending), deque()
            ops, self._ops = self._ops, []
        rows = self._batch.rows if self._batch else []
        self._batch = None
        for h in pending + [r.handle for r in rows]:
            if not h.done:
                h.done = True
                h._emit("error", err)
        for op in ops:
            if not op.future.done():
                op.future.set_exception(err)

    # -- generation (worker thread) -------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        if self._batch is None:
            return
        keep = [i for i, r in enumerate(self._batch.rows) if not r.handle.cancelled]
        if len(keep) != len(self._batch.rows):
            self._select_rows(keep)

    def _forward(self, input_ids, mask, positions, cache, rows: list[_Row]):
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.stats.max_rows = max(self.stats.max_rows, input_ids.shape[0])
        if self._peft is not None:
            out = self._peft(**kwargs, adapter_names=[r.adapter_key for r in rows])
        else:
            out = self.model(**kwargs)
        return out.logits[:, -1, :]

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _prefill(self, handles: list[RequestHandle]) -> None:
        rows = [_Row(h, self.device) for h in handles]
        width = max(len(h.prompt_ids) for h in handles)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, h in enumerate(handles):
            n = len(h.prompt_ids)
            ids[i, width - n :] = torch.tensor(h.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        self.stats.prefill_batches += 1
        logits = self._forward(ids, mask, positions, cache, rows)
        new = _Batch(rows, cache, mask, mask.sum(-1))
        if self._cache_layers(cache) is None:
            self._can_join = False  # e.g. sliding-window layers: run each batch to its end instead
        if self._batch is None:
            self._batch = new
        else:
            self._merge(new)
        self._after_logits(logits, rows, offset=len(self._batch.rows) - len(rows))

    def _decode_step(self) -> None:
        b = self._batch
        assert b is not None
        ids = torch.tensor([[r.next_token] for r in b.rows], dtype=torch.long, device=self.device)
        b.mask = torch.cat([b.mask, torch.ones((len(b.rows), 1), dtype=b.mask.dtype, device=self.device)], dim=1)
        logits = self._forward(ids, b.mask, b.positions.unsqueeze(1), b.cache, b.rows)
        b.positions = b.positions + 1
        self.stats.decode_steps += 1
        self._after_logits(logits, b.rows, offset=0)

    def _after_logits(self, logits: torch.Tensor, rows: list[_Row], offset: int) -> None:
        """Sample one token for each of ``rows`` (batch rows ``offset..``), then finish rows that are done."""
        tokens = _sample(logits, [r.handle.params for r in rows], [r.generator for r in rows])
        finished: list[int] = []
        for i, (row, tok) in enumerate(zip(rows, tokens, strict=True)):
            if self._advance(row, tok):
                finished.append(offset + i)
        if finished:
            assert self._batch is not None
            gone = set(finished)
            self._select_rows([i for i in range(len(self._batch.rows)) if i not in gone])

    def _advance(self, row: _Row, tok: int) -> bool:
        """Add ``tok`` to ``row``; stream what is safe to stream; return True when the row is finished."""
        h = row.handle
        params = h.params
        self.stats.generated_tokens += 1
        row.generated.append(tok)
        finish: str | None = None
        if tok in self.eos_ids:
            finish = "stop"
            text = row.text
        else:
            text = self.tokenizer.decode(
                row.generated, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            text, stopped = _cut_at_stop(text, params.stop)
            if stopped:
                finish = "stop"
            elif len(row.generated) >= params.max_tokens:
                finish = "length"
        row.text = text
        if h.cancelled:
            return True
        if finish is None:
            safe = _streamable(text, params.stop)  # nothing that a stop string could take back
            if safe > row.sent:
                h._emit("delta", text[row.sent : safe])
                row.sent = safe
            row.next_token = tok
            return False
        if len(text) > row.sent:
            h._emit("delta", text[row.sent :])
        h.done = True
        self.stats.completed += 1
        h._emit(
            "done",
            Completion(
                text=text,
                finish_reason=finish,
                prompt_tokens=len(h.prompt_ids),
                completion_tokens=len(row.generated),
            ),
        )
        return True

    # -- KV cache bookkeeping -------------------------------------------------------------------
    def _cache_layers(self, cache) -> list | None:
        """The cache's layers if every one is a plain growing layer we can pad/trim, else None."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            return None
        return layers

    def _select_rows(self, keep: list[int]) -> None:
        b = self._batch
        assert b is not None
        if not keep:
            self._batch = None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        b.cache.batch_select_indices(idx)
        b.mask = b.mask[idx]
        b.positions = b.positions[idx]
        b.rows = [b.rows[i] for i in keep]
        # Drop leading columns that are padding for every remaining row.
        layers = self._cache_layers(b.cache)
        if layers is None:
            return
        live = b.mask.any(dim=0).nonzero()
        first = int(live[0].item()) if len(live) else 0
        if first > 0:
            b.mask = b.mask[:, first:]
            for layer in layers:
                if layer.is_initialized and layer.keys is not None and layer.keys.numel():
                    layer.keys = layer.keys[:, :, first:, :]
                    layer.values = layer.values[:, :, first:, :]

    def _merge(self, new: _Batch) -> None:
        """Append ``new``'s rows to the running batch, left-padding the shorter KV cache."""
        b = self._batch
        assert b is not None
        old_layers, new_layers = self._cache_layers(b.cache), self._cache_layers(new.cache)
        if old_layers is None or new_layers is None:  # pragma: no cover - other model families
            raise RuntimeError("cannot merge this model's KV cache")
        width = max(b.mask.shape[1], new.mask.shape[1])

        def pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        pad_old, pad_new = width - b.mask.shape[1], width - new.mask.shape[1]
        for lo, ln in zip(old_layers, new_layers, strict=True):
            if not (lo.is_initialized and ln.is_initialized):
                raise RuntimeError("uninitialised cache layer")
            lo.keys = torch.cat([pad(lo.keys, pad_old, 2), pad(ln.keys, pad_new, 2)], dim=0)
            lo.values = torch.cat([pad(lo.values, pad_old, 2), pad(ln.values, pad_new, 2)], dim=0)
        b.mask = torch.cat([pad(b.mask, pad_old, 1), pad(new.mask, pad_new, 1)], dim=0)
        b.positions = torch.cat([b.positions, new.positions])
        b.rows = b.rows + new.rows
