"""Per-user rate limit on search and feedback: a token bucket per user, shared by the replicas through Redis.

Each user has a bucket of RATE_LIMIT_BURST tokens, refilled at RATE_LIMIT_PER_MINUTE (0 turns the limit
off). A request takes one token; one that finds the bucket empty gets 429 with `Retry-After` (whole
seconds until the next token, at least 1).

The key is the user id as the search route resolves it: the body's `user_id`, else the `X-User-Id`
header. A feedback body names no user (only the event does, and looking the event up would cost a store
read on every request), so feedback is keyed by `X-User-Id` when the client sends it. A request with
no user id is keyed by the client address: `request.client.host`, or the first `X-Forwarded-For` hop
with RATE_LIMIT_TRUST_FORWARDED (only behind a load balancer that sets it; otherwise clients choose it).

- REDIS_URL set: the buckets live in Redis, updated atomically by one Lua script that reads Redis's own
  clock (`TIME`), so every replica shares each bucket and their clock skew does not matter. Keys expire
  once the bucket would be full again. If Redis is unreachable the limiter **fails open**: the request
  is served, counted in `abloop_rate_limit_errors_total`, and a warning is logged at most once a
  minute. The limiter never causes a 5xx.
- REDIS_URL unset: the buckets live in this process, so each replica limits on its own; the least
  recently used are dropped beyond 100,000 keys, so many user ids cannot grow memory without bound.
  A server of several workers (`abloop proxy --workers N`, which exports WEB_CONCURRENCY=N to them)
  splits each user's budget: every worker allows RATE_LIMIT_PER_MINUTE / N and a burst of
  RATE_LIMIT_BURST // N (at least 1). The kernel hands each *connection* to one worker, so a user's
  requests land on any of them; split, the server never admits more than the limit whichever way they
  spread (unsplit it would admit up to N times it), at the cost that a client holding one keep-alive
  connection gets 1/N of it. REDIS_URL gives one exact budget.

A rejected request never reaches an arm, so it is **not logged as a search event**; it is counted in
`abloop_rate_limited_total{route}`. The check runs before the body's fields are validated, so a request
refused with 422 counts against the limit too.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from fastapi import Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from prometheus_client import Counter

from proxy.deps import StateDep
from proxy.metrics import Metrics
from proxy.schemas import utf8_header
from store.config import Settings

log = logging.getLogger("abloop.proxy.ratelimit")

MAX_LOCAL_KEYS = 100_000
# The check sits on every request: a slow Redis fails open quickly rather than adding its latency.
_REDIS_TIMEOUT_S = 0.5
# After a failure, requests skip Redis this long, so a Redis that hangs costs one timeout per second,
# not one per request.
_REDIS_RETRY_S = 1.0
_WARN_EVERY_S = 60.0

# KEYS[1] the bucket; ARGV: tokens per second, burst, TTL in seconds. Returns the seconds to wait
# ("0": allowed, a token taken) as a string, because Redis truncates Lua numbers to integers.
# The same arithmetic as LocalBuckets.take.
_TAKE_LUA = """
local rate, burst, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local saved = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(saved[1]), tonumber(saved[2])
if tokens == nil or ts == nil then
  tokens, ts = burst, now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], ttl)
return tostring(wait)
"""


class Buckets(Protocol):
    async def take(self, key: str) -> float:
        """Take a token from `key`'s bucket: 0.0 if there was one, else the seconds until there is."""

    async def aclose(self) -> None: ...


class RateLimited(HTTPException):
    def __init__(self, per_minute: int, wait_s: float) -> None:
        seconds = retry_after(wait_s)
        super().__init__(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"rate limit: {per_minute} requests per minute per user; retry after {seconds} s",
            headers={"Retry-After": str(seconds)},
        )


async def rate_limited(_request: Request, error: RateLimited) -> JSONResponse:
    """The 429 body: `{"message": …}` with `Retry-After`."""
    return JSONResponse(status_code=error.status_code, content={"message": error.detail}, headers=error.headers)


def retry_after(wait_s: float) -> int:
    """`Retry-After` is whole seconds; rounding up means a client that waits it finds a token."""
    return max(1, math.ceil(wait_s))


class LocalBuckets:
    """Token buckets in this process; the least recently used are dropped beyond `max_keys`.

    A dropped bucket comes back full: with the default bound that takes 100,000 other keys in
    between, and the alternative is memory that grows with every user id a client invents.
    """

    def __init__(self, per_minute: float, burst: int, *, max_keys: int = MAX_LOCAL_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = per_minute / 60
        self._burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: str) -> bool:
        return key in self._buckets

    async def take(self, key: str) -> float:
        now = self._clock()
        tokens, at = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + max(0.0, now - at) * self._rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self._rate
        self._buckets[key] = (tokens, now)  # re-inserted last: the most recently used
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait

    async def aclose(self) -> None:
        pass


class RedisBuckets:
    """Token buckets in Redis, shared by every replica; fails open (see the module's docstring)."""

    def __init__(self, url: str, per_minute: int, burst: int, *, prefix: str, errors: Counter) -> None:
        import redis.asyncio as aioredis  # only when REDIS_URL is set
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        # No retries: a failed check is answered by failing open, not by making the request wait.
        self._client = aioredis.from_url(url, socket_timeout=_REDIS_TIMEOUT_S,
                                         socket_connect_timeout=_REDIS_TIMEOUT_S, retry=Retry(NoBackoff(), 0))
        self._script = self._client.register_script(_TAKE_LUA)  # EVALSHA, loading the script when missing
        rate = per_minute / 60
        # A key left alone this long holds a full bucket, the same as no key.
        self._args = [rate, burst, math.ceil(burst / rate) + 1]
        self._prefix = prefix
        self._errors = errors
        self._failures: tuple[type[BaseException], ...] = (RedisError, OSError)
        self._skip_until = 0.0
        self._warn_after = 0.0

    async def take(self, key: str) -> float:
        now = time.monotonic()
        if now < self._skip_until:
            self._errors.inc()
            return 0.0
        try:
            return float(await self._script(keys=[self._prefix + key], args=self._args))
        except self._failures as error:
            self._skip_until = now + _REDIS_RETRY_S
            self._errors.inc()
            if now >= self._warn_after:
                self._warn_after = now + _WARN_EVERY_S
                log.warning("rate limit: Redis is unreachable (%s: %s); serving requests without a limit until "
                            "it answers", type(error).__name__, error)
            return 0.0

    async def aclose(self) -> None:
        await self._client.aclose()


class RateLimiter:
    """The proxy's limiter, made in the app's lifespan; `check` is what the routes' dependency calls."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.per_minute = settings.rate_limit_per_minute
        self._trust_forwarded = settings.rate_limit_trust_forwarded
        self._rejected = metrics.rate_limited
        self._buckets = _buckets(settings, metrics)

    async def check(self, request: Request) -> None:
        """Take a token for the request's user; raise RateLimited (429) when there is none."""
        if self._buckets is None:
            return
        wait = await self._buckets.take(await self._key(request))
        if wait > 0:
            self._rejected.labels(_route(request)).inc()
            raise RateLimited(self.per_minute, wait)

    async def aclose(self) -> None:
        if self._buckets is not None:
            await self._buckets.aclose()

    async def _key(self, request: Request) -> str:
        user_id = await _body_user_id(request) or _header_user_id(request)
        if user_id:
            return "user:" + user_id
        return "addr:" + self._address(request)

    def _address(self, request: Request) -> str:
        if self._trust_forwarded:
            first_hop = request.headers.get("x-forwarded-for", "").split(",")[0].strip()
            if first_hop:
                return first_hop
        return request.client.host if request.client else "unknown"


def _header_user_id(request: Request) -> str | None:
    """X-User-Id as routing reads it (UTF-8); a header that is not UTF-8 is refused by the route anyway."""
    raw = request.headers.get("x-user-id")
    try:
        return utf8_header(raw) if raw else None
    except ValueError:
        return raw


def _buckets(settings: Settings, metrics: Metrics) -> Buckets | None:
    if settings.rate_limit_per_minute == 0:
        return None
    if settings.redis_url:
        return RedisBuckets(settings.redis_url, settings.rate_limit_per_minute, settings.rate_limit_burst,
                            prefix=settings.rate_limit_key_prefix, errors=metrics.rate_limit_errors)
    workers = _server_workers()
    if workers == 1:
        return LocalBuckets(settings.rate_limit_per_minute, settings.rate_limit_burst)
    per_minute, burst = settings.rate_limit_per_minute / workers, max(1, settings.rate_limit_burst // workers)
    log.info("rate limit: %d workers without REDIS_URL share each user's budget: %g requests per minute and a "
             "burst of %d in each", workers, per_minute, burst)
    return LocalBuckets(per_minute, burst)


def _server_workers() -> int:
    """The worker processes of this server: WEB_CONCURRENCY (as `abloop proxy` exports it, and uvicorn and
    gunicorn read it), else 1."""
    try:
        return max(1, int(os.environ.get("WEB_CONCURRENCY") or 1))
    except ValueError:
        return 1


async def _body_user_id(request: Request) -> str | None:
    """The body's `user_id`, read from the JSON FastAPI has already parsed (Starlette caches it).

    Dependencies run before the body model is validated, so the value is checked here: anything but
    a short string is ignored, and the request is then refused with 422 anyway.
    """
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # not JSON, or nested too deep for json.loads: the route answers 422
        return None
    user_id = body.get("user_id") if isinstance(body, dict) else None
    return user_id if isinstance(user_id, str) and 0 < len(user_id) <= 256 else None


def _route(request: Request) -> str:
    """The route's path template, so the label's values stay few."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or request.url.path


async def enforce_rate_limit(request: Request, state: StateDep) -> None:
    """The routes' dependency: 429 with Retry-After over the user's rate limit."""
    await state.rate_limiter.check(request)


RateLimitDep = Depends(enforce_rate_limit)
