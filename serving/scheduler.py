"""The waiting queue and admission into the running batch (vLLM's scheduler, reduced to one policy).

Bounded: a full queue refuses a request rather than growing. First come, first served: waiting requests
join the running batch between decode steps while it has room. The engine's condition variable guards
the queue, so the worker can sleep on it until there is work.
"""

from __future__ import annotations

import threading
from collections import deque

from serving.errors import QueueFull
from serving.requests import EngineStats, RequestHandle


class Scheduler:
    def __init__(self, cond: threading.Condition, stats: EngineStats, *, max_batch: int, max_queue: int):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._cond = cond
        self._stats = stats
        self._waiting: deque[RequestHandle] = deque()

    def add(self, handle: RequestHandle) -> None:
        """Queue ``handle``; the caller holds the condition. Raises :class:`QueueFull` when full."""
        self._drop_cancelled()  # a client that went away while waiting holds no place in the queue
        if len(self._waiting) >= self.max_queue:
            self._stats.rejected += 1
            raise QueueFull(f"The server is busy ({len(self._waiting)} requests waiting); retry shortly.")
        self._waiting.append(handle)
        self._cond.notify_all()

    def admit(self, running_rows: int) -> list[RequestHandle]:
        """Take the waiting requests that fit beside ``running_rows`` (cancelled ones are dropped)."""
        admitted: list[RequestHandle] = []
        with self._cond:
            while self._waiting and running_rows + len(admitted) < self.max_batch:
                handle = self._waiting.popleft()
                if not handle.cancelled:
                    handle.mark_admitted()
                    admitted.append(handle)
        return admitted

    def drain(self) -> list[RequestHandle]:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        return waiting

    def waiting_for(self, adapter: str) -> bool:
        """Whether a live waiting request uses ``adapter`` (an unload waits for it)."""
        with self._cond:
            return any(h.adapter == adapter and not h.cancelled for h in self._waiting)

    def __len__(self) -> int:
        """Live waiting requests (cancelled ones stay in the deque until admission or the next add)."""
        return sum(not h.cancelled for h in self._waiting)

    def _drop_cancelled(self) -> None:
        if any(h.cancelled for h in self._waiting):
            self._waiting = deque(h for h in self._waiting if not h.cancelled)
