"""A submitted request as both sides see it: the event loop awaits it, the worker thread feeds it.

The handle is the only object the two threads share per request: the worker emits deltas, the final
:class:`Completion` or an error through the loop's thread-safe queue; the loop may cancel it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from serving.sampling import SamplingParams


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
    masked_forwards: int = 0  # forward calls whose rows used different adapters (serving.lora_routing)
    per_row_forwards: int = 0  # forward calls with adapters loaded through peft's per-row adapter_names

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class RequestHandle:
    """A submitted request: iterate :meth:`deltas` for streaming, or await :meth:`result`."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
                 on_cancel: Callable[[], None]):
        self.prompt_ids = prompt_ids
        self.params = params
        self.adapter = adapter  # None = base model
        self.cancelled = False
        self.done = False
        self.completion: Completion | None = None
        # Monotonic seconds: queued, taken into the running batch, answered (or failed).
        self.submitted_at = time.monotonic()
        self.admitted_at: float | None = None
        self.finished_at: float | None = None
        self._on_cancel = on_cancel  # wakes the worker so it drops the row now
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    @property
    def queue_wait_s(self) -> float | None:
        """Seconds between submission and admission into the running batch (None: never admitted)."""
        return None if self.admitted_at is None else self.admitted_at - self.submitted_at

    @property
    def generation_s(self) -> float | None:
        """Seconds from admission to the last token (None: not admitted or not finished)."""
        if self.admitted_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.admitted_at

    # -- called from the worker thread -------------------------------------------------------
    def mark_admitted(self) -> None:
        self.admitted_at = time.monotonic()

    def emit(self, kind: str, payload: Any) -> None:
        """Deliver "delta" (text), "done" (a Completion) or "error" (an exception) to the awaiting side."""
        if kind != "delta":
            self.finished_at = time.monotonic()
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    def fail(self, error: Exception) -> None:
        if not self.done:
            self.done = True
            self.emit("error", error)

    # -- called from the event loop ----------------------------------------------------------
    def cancel(self) -> None:
        if not self.done:
            self.cancelled = True
            self._on_cancel()

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
