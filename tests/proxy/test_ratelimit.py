"""The per-user rate limit (proxy/ratelimit.py): the in-process token bucket on an injected clock, the limit
through the real proxy app, and buckets shared by two replicas through the real Redis."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from sqlalchemy import func, select

import proxy.ratelimit as ratelimit
from proxy.metrics import Metrics
from proxy.ratelimit import LocalBuckets, RedisBuckets, _server_workers, retry_after
from store.models import Feedback
from tests.conftest import free_port
from tests.proxy.conftest import REDIS_URL, Clock, make_settings, running_proxy
from tests.proxy.test_ingest_metrics import _samples
from tests.proxy.test_search_api import _events

SEARCH = "/api/v1/search"
FEEDBACK = "/api/v1/feedback"




def _proxy(tmp_path, upstream, **overrides):
    """A proxy against the stub upstream; 2 requests a minute is one token per 30 s: no refill during a test."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    values = {"rate_limit_per_minute": 2, "rate_limit_burst": 3, **overrides}
    return running_proxy(make_settings(tmp_path, llm_api_base=upstream[1], llm_model="control-model", **values))


def _search(client: httpx.Client, url: str, user_id: str | None = None, **headers: str) -> httpx.Response:
    body = {"query": "how do I sort a list?"} | ({"user_id": user_id} if user_id else {})
    return client.post(url + SEARCH, json=body, headers=headers)


def _rate_limited(metrics: dict, route: str) -> float:
    return metrics[("abloop_rate_limited_total", (("route", route),))]


def _limit_errors(metrics: dict) -> float:
    return metrics[("abloop_rate_limit_errors_total", ())]


# The token bucket, in process.

async def test_a_burst_is_allowed_then_the_wait_is_until_the_next_token():
    clock = Clock()
    buckets = LocalBuckets(30, 2, clock=clock)  # a token every 2 s
    assert [await buckets.take("alice") for _ in range(2)] == [0.0, 0.0]
    assert await buckets.take("alice") == pytest.approx(2.0)
    clock.now += 0.5
    assert await buckets.take("alice") == pytest.approx(1.5)


def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one():
    assert [retry_after(w) for w in (0.01, 1.0, 1.01, 29.5)] == [1, 1, 2, 30]


async def test_tokens_refill_over_time_up_to_the_burst():
    clock = Clock()
    buckets = LocalBuckets(30, 3, clock=clock)
    for _ in range(3):
        assert await buckets.take("alice") == 0.0
    clock.now += 2.0  # exactly one token
    assert await buckets.take("alice") == 0.0
    assert await buckets.take("alice") > 0
    clock.now += 3600.0  # an hour refills the bucket to the burst, not beyond
    assert [await buckets.take("alice") == 0.0 for _ in range(4)] == [True, True, True, False]


async def test_users_have_independent_buckets():
    buckets = LocalBuckets(30, 1, clock=Clock())
    assert await buckets.take("alice") == 0.0
    assert await buckets.take("alice") > 0
    assert await buckets.take("bob") == 0.0


async def test_buckets_are_bounded_dropping_the_least_recently_used():
    buckets = LocalBuckets(30, 1, max_keys=2, clock=Clock())
    await buckets.take("a")
    await buckets.take("b")
    await buckets.take("a")  # refused, but a is now the most recently used
    await buckets.take("c")
    assert len(buckets) == 2 and "b" not in buckets and "a" in buckets
    assert await buckets.take("a") > 0, "a's empty bucket was kept"
    assert await buckets.take("b") == 0.0, "b was dropped and comes back full"
    many = LocalBuckets(30, 1, max_keys=100, clock=Clock())
    for n in range(1000):
        await many.take(f"user-{n}")
    assert len(many) == 100


# Through the real proxy app.

def test_a_user_over_the_limit_gets_429_while_another_user_is_served(tmp_path, client, control_upstream):
    with _proxy(tmp_path, control_upstream) as (url, app):
        alice = [_search(client, url, "alice") for _ in range(5)]
        by_header = _search(client, url, **{"X-User-Id": "alice"})  # the same user, named by the header
        bob = _search(client, url, "bob")
        metrics = _samples(client.get(url + "/metrics").text)
        events = _events(app)
    assert [r.status_code for r in alice] == [200, 200, 200, 429, 429]
    assert by_header.status_code == 429 and bob.status_code == 200
    seconds = alice[3].headers["retry-after"]
    assert 15 < int(seconds) <= 30  # a token every 30 s, and the burst was taken well within the last 15 s
    assert alice[3].json() == {"message": f"rate limit: 2 requests per minute per user; retry after {seconds} s"}
    assert _rate_limited(metrics, SEARCH) == 3 and _rate_limited(metrics, FEEDBACK) == 0
    # A refused search never reached an arm: it is not an event.
    assert sorted(e.user_id for e in events) == ["alice", "alice", "alice", "bob"]


def test_feedback_is_limited_by_x_user_id_else_by_client_address(tmp_path, client, control_upstream):
    with _proxy(tmp_path, control_upstream, rate_limit_burst=2) as (url, app):
        request_id = _search(client, url, "searcher").json()["request_id"]
        thumbs_up = {"request_id": request_id, "thumbs": "up"}
        by_user = [client.post(url + FEEDBACK, json=thumbs_up, headers={"X-User-Id": "rater"}) for _ in range(3)]
        anonymous = [client.post(url + FEEDBACK, json=thumbs_up) for _ in range(3)]
        another_user = client.post(url + FEEDBACK, json=thumbs_up, headers={"X-User-Id": "another"})
        metrics = _samples(client.get(url + "/metrics").text)
        _events(app)  # flushes the write queue
        with app.state.abloop.db.session() as session:
            stored = session.scalar(select(func.count()).select_from(Feedback))
    assert [r.status_code for r in by_user] == [201, 201, 429]
    assert [r.status_code for r in anonymous] == [201, 201, 429]
    assert another_user.status_code == 201
    assert by_user[2].headers["retry-after"] and by_user[2].json()["message"].startswith("rate limit: 2 requests")
    assert _rate_limited(metrics, FEEDBACK) == 2
    assert stored == 5


def test_anonymous_requests_use_the_forwarded_address_only_when_trusted(tmp_path, client, control_upstream):
    def codes(url: str, *hops: str) -> list[int]:
        return [_search(client, url, **{"X-Forwarded-For": f"{hop}, 10.0.0.1"}).status_code for hop in hops]

    trusting = {"rate_limit_burst": 1, "rate_limit_trust_forwarded": True}
    with _proxy(tmp_path / "trusted", control_upstream, **trusting) as (url, _app):
        trusted = codes(url, "198.51.100.1", "198.51.100.1", "198.51.100.2")
    with _proxy(tmp_path / "untrusted", control_upstream, rate_limit_burst=1) as (url, _app):
        untrusted = codes(url, "198.51.100.1", "198.51.100.2")  # both are 127.0.0.1
    assert trusted == [200, 429, 200]
    assert untrusted == [200, 429]


def test_a_rate_of_zero_turns_the_limit_off(tmp_path, client, control_upstream):
    with _proxy(tmp_path, control_upstream, rate_limit_per_minute=0, rate_limit_burst=1) as (url, _app):
        codes = [_search(client, url, "alice").status_code for _ in range(6)]
        metrics = _samples(client.get(url + "/metrics").text)
    assert codes == [200] * 6
    assert _rate_limited(metrics, SEARCH) == 0


def test_a_wait_under_a_second_is_still_a_refusal(tmp_path, client, control_upstream):
    """61 a minute and a burst of 1: the second request at once must wait about 0.98 s, rounded up to 1."""
    with _proxy(tmp_path, control_upstream, rate_limit_per_minute=61, rate_limit_burst=1) as (url, _app):
        first, second = (_search(client, url, "dave") for _ in range(2))
    assert (first.status_code, second.status_code, second.headers["retry-after"]) == (200, 429, "1")


@pytest.mark.parametrize(("workers", "burst", "codes"), [("1", 2, [200, 200, 429]), ("2", 4, [200, 200, 429]),
                                                          ("3", 2, [200, 429])])
def test_workers_without_redis_split_each_users_budget(tmp_path, client, control_upstream, monkeypatch,
                                                       workers, burst, codes):
    """`abloop proxy --workers N` exports WEB_CONCURRENCY: each worker keeps 1/N of the rate and of the burst
    (at least 1), so a user spread over the workers gets about the budget one process would give."""
    monkeypatch.setenv("WEB_CONCURRENCY", workers)
    with _proxy(tmp_path, control_upstream, rate_limit_burst=burst) as (url, _app):
        responses = [_search(client, url, "erin") for _ in codes]
    assert [r.status_code for r in responses] == codes
    # 2 a minute is a token every 30 s in one process, every 60 s (or 90 s) in each of 2 (or 3) workers.
    token_every_s = 30 * int(workers)
    assert token_every_s - 30 < int(responses[-1].headers["retry-after"]) <= token_every_s


async def test_an_unreachable_redis_is_retried_after_a_pause_and_warned_about_again_after_a_minute(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(ratelimit.time, "monotonic", clock)
    buckets = RedisBuckets(f"redis://127.0.0.1:{free_port()}/0", 60, 1, prefix="p:", errors=Metrics().rate_limit_errors)
    calls: list[float] = []

    async def unreachable(**kwargs):
        calls.append(clock.now)
        raise ConnectionError("connection refused")

    buckets._script = unreachable  # the Lua call, failing as a closed port does, without the 0.5 s timeout
    warnings: list[str] = []
    monkeypatch.setattr(ratelimit.log, "warning", lambda message, *args: warnings.append(message % args))
    try:
        for at in (1000.0, 1000.5, 1001.0, 1030.0, 1060.5):
            clock.now = at
            assert await buckets.take("user:frank") == 0.0  # fails open every time
    finally:
        await buckets.aclose()
    assert calls == [1000.0, 1001.0, 1030.0, 1060.5]  # not within a second of a failure
    assert len(warnings) == 2 and "Redis is unreachable (ConnectionError: connection refused)" in warnings[0]


def test_an_unreachable_redis_fails_open_and_warns_once(tmp_path, client, control_upstream, caplog):
    closed_port = f"redis://127.0.0.1:{free_port()}/0"
    with caplog.at_level(logging.WARNING, logger="abloop.proxy.ratelimit"), \
            _proxy(tmp_path, control_upstream, redis_url=closed_port, rate_limit_burst=1) as (url, _app):
        codes = [_search(client, url, "alice").status_code for _ in range(4)]
        metrics = _samples(client.get(url + "/metrics").text)
    assert codes == [200] * 4
    assert _limit_errors(metrics) == 4 and _rate_limited(metrics, SEARCH) == 0
    warnings = [r for r in caplog.records if r.name == "abloop.proxy.ratelimit"]
    assert len(warnings) == 1 and "Redis is unreachable" in warnings[0].getMessage()


# Shared through the real Redis.

def test_two_replicas_share_one_users_bucket_through_redis(tmp_path, client, control_upstream, redis_prefix):
    server, prefix = redis_prefix
    shared = {"redis_url": REDIS_URL, "rate_limit_key_prefix": prefix, "rate_limit_burst": 4}
    with _proxy(tmp_path / "a", control_upstream, **shared) as (a, _app_a), \
            _proxy(tmp_path / "b", control_upstream, **shared) as (b, _app_b):
        carol = [_search(client, url, "carol") for url in [a, b] * 4]
        dave = _search(client, b, "dave")
        metrics = [_samples(client.get(url + "/metrics").text) for url in (a, b)]
    # Four tokens between the two replicas, not four each; the next one 30 s after the first was taken.
    assert [r.status_code for r in carol] == [200] * 4 + [429] * 4
    assert all(15 < int(r.headers["retry-after"]) <= 30 for r in carol[4:])
    assert dave.status_code == 200
    assert [_rate_limited(m, SEARCH) for m in metrics] == [2, 2]
    assert [_limit_errors(m) for m in metrics] == [0, 0]
    # The bucket expires once it would be full again: 4 tokens at one per 30 s.
    assert 0 < server.ttl(prefix + "user:carol") <= 4 * 30 + 1


async def test_redis_buckets_refill_by_redis_time(redis_prefix):
    server, prefix = redis_prefix
    buckets = RedisBuckets(REDIS_URL, 2, 2, prefix=prefix, errors=Metrics().rate_limit_errors)
    try:
        assert [await buckets.take("erin") for _ in range(2)] == [0.0, 0.0]
        wait = await buckets.take("erin")
        assert 0 < wait <= 30
        assert await buckets.take("frank") == 0.0
        # Move erin's last update 30 s into the past, by Redis's clock: exactly one token more.
        seconds, micros = server.time()
        server.hset(prefix + "erin", "ts", str(seconds + micros / 1e6 - 30))
        assert await buckets.take("erin") == 0.0
        assert await buckets.take("erin") > 0
    finally:
        await buckets.aclose()


@pytest.mark.parametrize(("value", "workers"), [(None, 1), ("4", 4), ("0", 1), ("four", 1)])
def test_the_worker_count_is_read_from_web_concurrency(monkeypatch, value, workers):
    if value is None:
        monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    else:
        monkeypatch.setenv("WEB_CONCURRENCY", value)
    assert _server_workers() == workers


async def test_a_redis_that_never_answers_fails_open_after_one_try():
    """A black-holed Redis (the connection opens, no reply comes) must cost one short timeout, not a hang and
    not a round of retries: the request is served without a limit."""
    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.read(65536)  # the command arrives; no answer is ever sent

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    buckets = RedisBuckets(f"redis://127.0.0.1:{port}/0", 60, 1, prefix="p:", errors=Metrics().rate_limit_errors)
    try:
        async with server:
            assert await asyncio.wait_for(buckets.take("user:grace"), 10) == 0.0
            assert len(connections) == 1
    finally:
        for writer in connections:
            writer.close()
        await buckets.aclose()
