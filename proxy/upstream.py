"""Calls to the arms' OpenAI-compatible servers, with fallback and a circuit breaker per server."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from experiment.assignment import Arm
from proxy.http1 import KeepAliveTransport
from store import tracing


@dataclass(frozen=True)
class Target:
    base_url: str
    model: str


@dataclass(frozen=True)
class Failure:
    """One arm's failed call. `str()` is what a search client may read; `described` is for the operators."""

    arm: Arm
    reason: str  # generic ("HTTP 401 from the upstream", "timed out (ReadTimeout)"): never the upstream's words
    # What the upstream said (its error body, the exception's text): it may echo the request, Authorization
    # header included, so it goes only to the stored event and the log, redacted there.
    detail: str | None = None

    def __str__(self) -> str:
        return f"{self.arm}: {self.reason}"

    @property
    def described(self) -> str:
        return f"{self}: {self.detail}" if self.detail else str(self)


def describe(failures: tuple[Failure, ...] | list[Failure]) -> str | None:
    """Every failure with its detail, for the operators (unredacted: redact before storing it)."""
    return "; ".join(failure.described for failure in failures) or None


@dataclass(frozen=True)
class Completion:
    served_arm: Arm
    model: str
    answer: str
    tokens_in: int | None
    tokens_out: int | None
    llm_ms: float
    failures: tuple[Failure, ...] = ()  # arms tried before the one that answered


class UpstreamError(Exception):
    def __init__(self, reason: str, detail: str | None = None, *, timed_out: bool = False) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # see Failure: the public part
        self.detail = detail
        self.timed_out = timed_out


class AllArmsFailed(Exception):
    def __init__(self, failures: list[Failure], *, timed_out: bool) -> None:
        super().__init__(describe(failures))
        self.failures = failures
        self.timed_out = timed_out


@dataclass
class CircuitBreaker:
    """Closed until `threshold` consecutive failures; then open for `reset_s`, then one trial call."""

    threshold: int
    reset_s: float
    failures: int = 0
    opened_at: float | None = field(default=None)

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None and time.monotonic() - self.opened_at < self.reset_s

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if time.monotonic() - self.opened_at >= self.reset_s:
            # Half-open: let this one call through and hold the others back until it reports.
            self.opened_at = time.monotonic()
            return True
        return False

    def record_success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def record_failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.opened_at = time.monotonic()


class Upstream:
    """One pooled client for every arm; breakers are keyed by server so a dead one costs nothing.

    Its pool (proxy/http1.py, HTTP/1.1 keep-alive) holds at most `max_connections` open at once over
    all the arms' servers; a call beyond that waits for a free one within the timeout, a cancelled
    call closes its connection, and a request is never sent twice.
    """

    def __init__(
        self,
        *,
        timeout_s: float,
        api_key: str | None,
        max_tokens: int,
        temperature: float,
        failure_threshold: int,
        reset_s: float,
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            headers=headers,
            transport=transport or KeepAliveTransport(max_connections=max_connections),
        )
        self._max_tokens = max_tokens
        self._temperature = temperature
        self._threshold = failure_threshold
        self._reset_s = reset_s
        self.breakers: dict[str, CircuitBreaker] = {}

    def breaker(self, base_url: str) -> CircuitBreaker:
        found = self.breakers.get(base_url)
        if found is None:
            found = self.breakers[base_url] = CircuitBreaker(self._threshold, self._reset_s)
        return found

    async def complete(self, plan: list[tuple[Arm, Target]], messages: list[dict[str, Any]]) -> Completion:
        """Try the arms in order (assigned first); the first answer wins.

        A breaker that is open skips its arm, except for the last arm left: there is nothing to
        fall back to, so trying costs nothing extra.
        """
        failures: list[Failure] = []
        timed_out = False
        for position, (arm, target) in enumerate(plan):
            breaker = self.breaker(target.base_url)
            is_last = position == len(plan) - 1
            if not breaker.allow() and not is_last:
                failures.append(Failure(arm, "circuit open"))
                continue
            started = time.perf_counter()
            try:
                answer, tokens_in, tokens_out, model = await self._traced_call(arm, target, messages,
                                                                               fallback=position > 0)
            except UpstreamError as error:
                breaker.record_failure()
                failures.append(Failure(arm, error.reason, error.detail))
                timed_out = timed_out or error.timed_out
                continue
            breaker.record_success()
            return Completion(
                served_arm=arm,
                model=model,
                answer=answer,
                tokens_in=tokens_in,
                tokens_out=tokens_out,
                llm_ms=(time.perf_counter() - started) * 1000,
                failures=tuple(failures),
            )
        raise AllArmsFailed(failures, timed_out=timed_out)

    async def _traced_call(self, arm: Arm, target: Target, messages: list[dict[str, Any]], *,
                           fallback: bool) -> tuple[str, int | None, int | None, str]:
        """`_call` in a span of its own (a no-op while tracing is off)."""
        attributes = {"abloop.arm": arm, "abloop.model": target.model, "abloop.fallback": fallback,
                      "server.address": httpx.URL(target.base_url).host} if tracing.is_enabled() else None
        with tracing.span("upstream call", attributes, kind="client") as span:
            try:
                result = await self._call(target, messages)
            except UpstreamError as error:
                span.set_attribute("abloop.status", "timeout" if error.timed_out else "error")
                raise
            span.set_attribute("abloop.status", "ok")
            return result

    async def _call(self, target: Target, messages: list[dict[str, Any]]) -> tuple[str, int | None, int | None, str]:
        url = target.base_url.rstrip("/") + "/chat/completions"
        body = {
            "model": target.model,
            "messages": messages,
            "max_tokens": self._max_tokens,
            "temperature": self._temperature,
        }
        try:
            # The trace context (W3C traceparent), so that an OTel-aware upstream joins the request's trace.
            response = await self._client.post(url, json=body, headers=tracing.inject({}) or None)
        except httpx.TimeoutException as error:
            raise UpstreamError(f"timed out ({type(error).__name__})", timed_out=True) from error
        except httpx.HTTPError as error:
            raise UpstreamError(f"request failed ({type(error).__name__})", str(error)) from error
        if response.status_code != 200:
            raise UpstreamError(f"HTTP {response.status_code} from the upstream", response.text[:200])
        try:
            payload = response.json()
            answer = payload["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise UpstreamError("malformed completion", repr(error)) from error
        usage = payload.get("usage") or {}
        return answer, usage.get("prompt_tokens"), usage.get("completion_tokens"), payload.get("model") or target.model

    async def aclose(self) -> None:
        await self._client.aclose()
