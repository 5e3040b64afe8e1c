"""The arms' calls (proxy/upstream.py): the circuit breaker on an injected clock, and fallback over a faked
upstream (httpx.MockTransport). The same paths through the real app: tests/proxy/test_search_api.py."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

import proxy.upstream as upstream
from proxy.upstream import AllArmsFailed, CircuitBreaker, Failure, Target, Upstream
from tests.proxy.conftest import Clock

CONTROL = Target("http://control.test/v1", "control-model")
CANDIDATE = Target("http://candidate.test/v1", "candidate-model")


@pytest.fixture
def clock(monkeypatch) -> Clock:
    ticking = Clock()
    monkeypatch.setattr(upstream.time, "monotonic", ticking)
    return ticking


def test_the_breaker_opens_at_its_threshold_then_lets_one_trial_through_after_reset(clock):
    breaker = CircuitBreaker(threshold=3, reset_s=10.0)
    for _ in range(2):
        breaker.record_failure()
    assert breaker.allow() and not breaker.is_open  # two failures: still closed
    breaker.record_failure()
    assert breaker.is_open and not breaker.allow()
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1  # reset_s after opening: half-open
    assert breaker.allow()  # the one trial call
    assert not breaker.allow()  # the others wait for its outcome
    breaker.record_failure()  # the trial failed: open again for reset_s
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()
    breaker.record_success()  # the trial answered: closed, its count of failures forgotten
    assert breaker.allow() and breaker.allow() and not breaker.is_open
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.allow()  # two new failures do not reopen a breaker whose count was reset


def _upstream(handler, *, threshold: int = 1, reset_s: float = 60.0) -> Upstream:
    return Upstream(timeout_s=5.0, api_key=None, max_tokens=16, temperature=0.0, failure_threshold=threshold,
                    reset_s=reset_s, transport=httpx.MockTransport(handler))


def _answer(model: str) -> httpx.Response:
    return httpx.Response(200, json={"model": model, "choices": [{"message": {"content": f"from {model}"}}],
                                     "usage": {"prompt_tokens": 3, "completion_tokens": 2}})


async def test_a_failing_candidate_falls_back_to_control_and_its_open_breaker_skips_it(clock):
    called: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        called.append(request.url.host)
        if request.url.host == "candidate.test":
            return httpx.Response(500, text="boom")
        return _answer("control-model")

    arms = _upstream(handler, threshold=1)
    try:
        plan = [("candidate", CANDIDATE), ("control", CONTROL)]
        first = await arms.complete(plan, [{"role": "user", "content": "q"}])
        second = await arms.complete(plan, [{"role": "user", "content": "q"}])
    finally:
        await arms.aclose()
    assert (first.served_arm, first.answer, first.model) == ("control", "from control-model", "control-model")
    assert (first.tokens_in, first.tokens_out) == (3, 2)
    assert first.failures == (Failure("candidate", "HTTP 500 from the upstream", "boom"),)
    assert second.failures == (Failure("candidate", "circuit open"),)  # not called again while open
    assert called == ["candidate.test", "control.test", "control.test"]


async def test_the_last_arm_is_tried_even_with_its_breaker_open(clock):
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        return httpx.Response(503, text="down") if len(calls) == 1 else _answer("control-model")

    arms = _upstream(handler, threshold=1)
    try:
        with pytest.raises(AllArmsFailed):
            await arms.complete([("control", CONTROL)], [])
        assert arms.breaker(CONTROL.base_url).is_open
        answered = await arms.complete([("control", CONTROL)], [])  # nothing to fall back to: try anyway
    finally:
        await arms.aclose()
    assert answered.served_arm == "control" and calls == ["control.test", "control.test"]


@pytest.mark.parametrize(("candidate_fails", "timed_out"), [("timeout", True), ("error", False)])
async def test_every_arm_failing_says_whether_one_timed_out(clock, candidate_fails: str, timed_out: bool):
    """A timeout anywhere makes the proxy answer 504 rather than 502."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "candidate.test" and candidate_fails == "timeout":
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(502, text="bad gateway")

    arms = _upstream(handler, threshold=5)
    try:
        with pytest.raises(AllArmsFailed) as failed:
            await arms.complete([("candidate", CANDIDATE), ("control", CONTROL)], [])
    finally:
        await arms.aclose()
    assert failed.value.timed_out is timed_out
    assert [failure.arm for failure in failed.value.failures] == ["candidate", "control"]
    reason = "timed out (ReadTimeout)" if timed_out else "HTTP 502 from the upstream: bad gateway"
    assert str(failed.value) == f"candidate: {reason}; control: HTTP 502 from the upstream: bad gateway"


async def test_the_call_goes_to_chat_completions_under_the_base_url_and_is_timed():
    paths: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        await asyncio.sleep(0.05)
        return _answer("control-model")

    arms = _upstream(handler)
    try:
        started = time.perf_counter()
        answered = await arms.complete([("control", Target("http://control.test/v1/", "control-model"))], [])
        elapsed_ms = (time.perf_counter() - started) * 1000
    finally:
        await arms.aclose()
    assert paths == ["/v1/chat/completions"]  # one slash, whether or not the base URL ends with one
    assert 50 <= answered.llm_ms <= elapsed_ms  # milliseconds, of the call alone
