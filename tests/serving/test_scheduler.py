"""The waiting queue: bounded, first come first served, cancelled requests dropped at admission."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from serving.errors import QueueFull
from serving.requests import EngineStats
from serving.scheduler import Scheduler


@dataclass
class _Handle:
    """What the scheduler reads of a RequestHandle (the real one needs an event loop and a worker)."""

    name: str
    adapter: str | None = None
    cancelled: bool = False
    admitted: bool = False

    def mark_admitted(self) -> None:
        self.admitted = True


class _CountingCondition(threading.Condition):
    def __init__(self) -> None:
        super().__init__()
        self.notified = 0

    def notify_all(self) -> None:
        self.notified += 1
        super().notify_all()


def _scheduler(max_batch: int = 2, max_queue: int = 3) -> tuple[Scheduler, _CountingCondition, EngineStats]:
    cond, stats = _CountingCondition(), EngineStats()
    return Scheduler(cond, stats, max_batch=max_batch, max_queue=max_queue), cond, stats


def _add(scheduler: Scheduler, cond: threading.Condition, *handles: _Handle) -> None:
    for handle in handles:
        with cond:  # the engine holds the condition when it adds
            scheduler.add(handle)


@pytest.mark.parametrize(("max_batch", "max_queue"), [(0, 1), (1, 0), (-1, 5)])
def test_sizes_below_one_are_refused(max_batch: int, max_queue: int):
    with pytest.raises(ValueError, match="^max_batch and max_queue must be >= 1$"):
        Scheduler(threading.Condition(), EngineStats(), max_batch=max_batch, max_queue=max_queue)


def test_the_smallest_scheduler_holds_one_request():
    scheduler, cond, _ = _scheduler(max_batch=1, max_queue=1)
    _add(scheduler, cond, _Handle("a"))
    assert [h.name for h in scheduler.admit(0)] == ["a"]


def test_a_full_queue_refuses_and_counts_the_refusal_and_every_add_wakes_the_worker():
    scheduler, cond, stats = _scheduler(max_queue=2)
    _add(scheduler, cond, _Handle("a"), _Handle("b"))
    assert cond.notified == 2 and len(scheduler) == 2
    with cond, pytest.raises(QueueFull, match=r"^The server is busy \(2 requests waiting\); retry shortly\.$"):
        scheduler.add(_Handle("c"))
    assert stats.rejected == 1 and len(scheduler) == 2 and cond.notified == 2
    with cond, pytest.raises(QueueFull):
        scheduler.add(_Handle("d"))
    assert stats.rejected == 2


def test_requests_cancelled_while_waiting_hold_no_place_in_the_queue():
    # Clients that went away while queued behind a long request counted against max_queue: a new request
    # got 503 queue_full though nobody was waiting.
    scheduler, cond, stats = _scheduler(max_batch=1, max_queue=2)
    gone = [_Handle("a"), _Handle("b")]
    _add(scheduler, cond, *gone)
    for handle in gone:
        handle.cancelled = True
    assert len(scheduler) == 0  # what /stats and /health report as the queue
    _add(scheduler, cond, _Handle("c"), _Handle("d"))
    assert stats.rejected == 0 and len(scheduler) == 2
    with cond, pytest.raises(QueueFull, match=r"\(2 requests waiting\)"):
        scheduler.add(_Handle("e"))  # live ones still fill it
    assert [h.name for h in scheduler.drain()] == ["c", "d"]  # the cancelled ones were dropped


def test_admission_is_first_come_first_served_up_to_the_batch_and_skips_cancelled_requests():
    scheduler, cond, _ = _scheduler(max_batch=3, max_queue=10)
    handles = [_Handle("a"), _Handle("b", cancelled=True), _Handle("c"), _Handle("d"), _Handle("e")]
    _add(scheduler, cond, *handles)
    assert scheduler.admit(3) == []  # the batch is full
    admitted = scheduler.admit(1)  # room for two: a, then c (b was cancelled and is dropped)
    assert [h.name for h in admitted] == ["a", "c"] and all(h.admitted for h in admitted)
    assert not handles[1].admitted and not handles[3].admitted
    assert len(scheduler) == 2
    assert [h.name for h in scheduler.admit(0)] == ["d", "e"] and len(scheduler) == 0


def test_drain_hands_back_everything_waiting_in_order():
    scheduler, cond, _ = _scheduler()
    _add(scheduler, cond, _Handle("a"), _Handle("b"))
    assert [h.name for h in scheduler.drain()] == ["a", "b"]
    assert len(scheduler) == 0 and scheduler.drain() == []


def test_waiting_for_an_adapter_counts_live_waiting_requests_only():
    scheduler, cond, _ = _scheduler(max_batch=1)
    _add(scheduler, cond, _Handle("a", adapter="x"), _Handle("b", adapter="y", cancelled=True), _Handle("c"))
    assert scheduler.waiting_for("x") and not scheduler.waiting_for("y") and not scheduler.waiting_for("z")
    scheduler.admit(0)  # "a" leaves the queue for the batch
    assert not scheduler.waiting_for("x")
