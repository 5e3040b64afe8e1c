"""/api/v1/search and /api/v1/feedback through the real app under uvicorn, against stub upstreams."""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest
from sqlalchemy import func, select

from store.db import Database
from store.models import Feedback, SearchEvent
from tests.proxy.conftest import dead_url, make_settings, on_app_loop, running_proxy


def _settings(tmp_path, control, candidate=None, share=0.0, **overrides):
    return make_settings(
        tmp_path,
        llm_api_base=control,
        llm_model="control-model",
        llm_api_base_new_model=candidate,
        llm_model_new="candidate-model",
        candidate_share=share,
        **overrides,
    )


def _events(app) -> list[SearchEvent]:
    state = app.state.abloop
    on_app_loop(app, state.writer.flush())
    with state.db.session() as session:
        return list(session.scalars(select(SearchEvent)))


def _arms(client: httpx.Client, url: str, users: list[str]) -> dict[str, str]:
    arms = {}
    for user in users:
        response = client.post(f"{url}/api/v1/search", json={"query": "what is a list?", "user_id": user})
        assert response.status_code == 200, response.text
        arms[user] = response.json()["arm"]
    return arms


def test_split_matches_share_within_binomial_bounds(tmp_path, client, control_upstream, candidate_upstream):
    n, share = 3000, 0.3
    settings = _settings(tmp_path, control_upstream[1], candidate_upstream[1], share)
    with running_proxy(settings) as (url, _app):
        arms = _arms(client, url, [f"user-{i}" for i in range(n)])
    candidates = sum(arm == "candidate" for arm in arms.values())
    sigma = math.sqrt(n * share * (1 - share))
    # 4.5 sigma: a false failure about once in 150,000 runs.
    assert abs(candidates - n * share) < 4.5 * sigma, (candidates, n * share, sigma)


def test_raising_the_share_only_moves_users_from_control_to_candidate(
    tmp_path, client, admin_headers, control_upstream, candidate_upstream
):
    # 400 users: about 160 move up and 200 back; every one of them is checked (the share's arithmetic over
    # all buckets is tests/experiment/test_assignment.py's).
    users = [f"user-{i}" for i in range(400)]
    settings = _settings(tmp_path, control_upstream[1], candidate_upstream[1], 0.2)
    with running_proxy(settings) as (url, _app):
        before = _arms(client, url, users)
        response = client.put(f"{url}/api/v1/admin/experiment", json={"candidate_share": 0.6}, headers=admin_headers)
        assert response.status_code == 200, response.text
        assert response.json()["candidate_share"] == 0.6
        after = _arms(client, url, users)
        client.put(f"{url}/api/v1/admin/experiment", json={"candidate_share": 0.1}, headers=admin_headers)
        lowered = _arms(client, url, users)
    moved_up = [u for u in users if before[u] != after[u]]
    assert moved_up, "raising the share moved nobody"
    assert all(before[u] == "control" and after[u] == "candidate" for u in moved_up)
    moved_down = [u for u in users if after[u] != lowered[u]]
    assert moved_down
    assert all(after[u] == "candidate" and lowered[u] == "control" for u in moved_down)


def test_no_user_id_goes_to_control_and_header_user_id_is_honoured(
    tmp_path, client, control_upstream, candidate_upstream
):
    settings = _settings(tmp_path, control_upstream[1], candidate_upstream[1], 1.0)
    with running_proxy(settings) as (url, app):
        anonymous = client.post(f"{url}/api/v1/search", json={"query": "q"})
        by_header = client.post(f"{url}/api/v1/search", json={"query": "q"}, headers={"X-User-Id": "alice"})
        events = {e.id: e for e in _events(app)}
    assert anonymous.status_code == 200 and anonymous.json()["arm"] == "control"
    assert anonymous.json()["answer"] == "control says hi"
    body = by_header.json()
    assert body["arm"] == "candidate" and body["served_arm"] == "candidate"
    assert body["model"] == "candidate-model" and body["answer"] == "candidate says hi"
    assert set(body) == {"request_id", "arm", "served_arm", "model", "answer", "items", "timings_ms"}
    assert set(body["timings_ms"]) == {"retrieval", "llm", "total"}
    assert events[body["request_id"]].user_id == "alice"
    assert events[anonymous.json()["request_id"]].user_id is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "query"),
        ({"query": ""}, "query"),
        ({"query": "x" * 4001}, "query"),
        ({"query": "q", "top_k": 0}, "top_k"),
        ({"query": "q", "top_k": 51}, "top_k"),
        ({"query": "q", "top_k": "many"}, "top_k"),
        ({"query": 42}, "query"),
        ({"query": "q", "user_id": 7}, "user_id"),
        ({"query": "q", "session_id": ["s"]}, "session_id"),
        ({"query": "q", "surprise": True}, "surprise"),
    ],
)
def test_malformed_search_gets_422_naming_the_field(tmp_path, client, control_upstream, body, field):
    with running_proxy(_settings(tmp_path, control_upstream[1])) as (url, app):
        response = client.post(f"{url}/api/v1/search", json=body)
        assert response.status_code == 422
        assert field in response.json()["message"], response.json()
        assert _events(app) == []


def test_invalid_json_gets_422(tmp_path, client, control_upstream):
    with running_proxy(_settings(tmp_path, control_upstream[1])) as (url, _app):
        response = client.post(
            f"{url}/api/v1/search", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert response.status_code == 422
    assert "JSON" in response.json()["message"]


@pytest.mark.parametrize(("content", "reason"), [
    (b'{"query": "q", "top_k": ' + b"9" * 5000 + b"}", "an integer over 4,300 digits"),
    (b'{"query": "q", "top_k": ' + b"[" * 3000 + b"]" * 3000 + b"}", "nested too deeply"),
    (b'{"query": "caf\xe9"}', "not UTF-8"),
])
def test_json_its_parser_cannot_hold_gets_422_naming_the_body(tmp_path, client, control_upstream, content, reason):
    """Bodies Python's JSON parser refuses past its syntax check: FastAPI answered 400 "There was an error parsing
    the body"."""
    with running_proxy(_settings(tmp_path, control_upstream[1])) as (url, app):
        response = client.post(f"{url}/api/v1/search", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        assert response.json()["message"] == f"invalid request: body: JSON body could not be parsed: {reason}"
        assert response.json()["detail"][0]["loc"] == ["body"]
        unknown = client.post(f"{url}/api/v1/feedback", json={"request_id": "nope", "rating": 3})
        assert unknown.status_code == 404 and set(unknown.json()) == {"detail"}  # other errors keep their shape
        assert _events(app) == []


def test_feedback_201_404_422(tmp_path, client, control_upstream):
    with running_proxy(_settings(tmp_path, control_upstream[1])) as (url, app):
        request_id = client.post(f"{url}/api/v1/search", json={"query": "q", "user_id": "u"}).json()["request_id"]
        # Straight away: the event may still be in the write queue, and that must not matter.
        created = client.post(f"{url}/api/v1/feedback", json={"request_id": request_id, "thumbs": "up"})
        rated = client.post(
            f"{url}/api/v1/feedback",
            json={"request_id": request_id, "rating": 2, "corrected_answer": "better", "comment": "meh"},
        )
        unknown = client.post(f"{url}/api/v1/feedback", json={"request_id": "nope", "rating": 5})
        no_signal = client.post(f"{url}/api/v1/feedback", json={"request_id": request_id, "comment": "hi"})
        bad_rating = client.post(f"{url}/api/v1/feedback", json={"request_id": request_id, "rating": 6})
        bad_thumbs = client.post(f"{url}/api/v1/feedback", json={"request_id": request_id, "thumbs": "sideways"})
        _events(app)
        with app.state.abloop.db.session() as session:
            rows = list(session.scalars(select(Feedback)))
    assert created.status_code == 201 and created.json()["feedback_id"]
    assert rated.status_code == 201
    assert unknown.status_code == 404 and "request_id" in unknown.json()["detail"]
    assert no_signal.status_code == 422 and "corrected_answer" in no_signal.json()["message"]
    assert bad_rating.status_code == 422 and "rating" in bad_rating.json()["message"]
    assert bad_thumbs.status_code == 422 and "thumbs" in bad_thumbs.json()["message"]
    assert sorted(r.id for r in rows) == sorted([created.json()["feedback_id"], rated.json()["feedback_id"]])
    assert {r.event_id for r in rows} == {request_id}
    corrected = next(r for r in rows if r.rating == 2)
    assert corrected.corrected_answer == "better" and corrected.comment == "meh"


def test_dead_candidate_falls_back_to_control_and_is_logged(tmp_path, client, control_upstream):
    # reset_s far beyond the test: the breaker never half-opens however slowly the machine runs the 20 calls.
    settings = _settings(tmp_path, control_upstream[1], dead_url(), 1.0, circuit_failure_threshold=3,
                         circuit_reset_s=3600)
    with running_proxy(settings) as (url, app):
        responses = [
            client.post(f"{url}/api/v1/search", json={"query": "q", "user_id": f"user-{i}"}) for i in range(20)
        ]
        events = _events(app)
        breaker = app.state.abloop.upstream.breakers[settings.llm_api_base_new_model]
        metrics = client.get(f"{url}/metrics").text
    assert all(r.status_code == 200 for r in responses)
    assert all(r.json()["arm"] == "candidate" and r.json()["served_arm"] == "control" for r in responses)
    assert all(r.json()["answer"] == "control says hi" for r in responses)
    assert len(events) == 20
    assert all(e.arm == "candidate" and e.served_arm == "control" and e.status == "fallback" for e in events)
    # After the threshold the breaker is open: the dead candidate is no longer called at all.
    assert breaker.is_open and breaker.failures == 3
    assert sum("circuit open" in (e.error or "") for e in events) == 17
    assert 'abloop_search_fallbacks_total{arm="candidate"} 20.0' in metrics


def test_both_arms_down_is_502_and_still_logged(tmp_path, client):
    settings = _settings(tmp_path, dead_url(), dead_url(), 0.5)
    with running_proxy(settings) as (url, app):
        response = client.post(f"{url}/api/v1/search", json={"query": "q", "user_id": "u"})
        events = _events(app)
    assert response.status_code == 502
    detail = response.json()["detail"]
    assert detail["request_id"] == events[0].id and detail["message"] == "every arm failed"
    assert len(detail["failures"]) == 2 and all("connect" in f.lower() for f in detail["failures"])
    assert events[0].status == "error" and events[0].served_arm is None and events[0].error
    timings = events[0].timings
    assert timings["llm"] is None and 0 <= timings["retrieval"] <= timings["total"] < 60_000  # milliseconds


def test_every_arm_timing_out_is_504_and_still_logged(tmp_path, client):
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    settings = _settings(tmp_path, "http://control.test/v1", "http://candidate.test/v1", 0.0)
    with running_proxy(settings, upstream=httpx.MockTransport(handler)) as (url, app):
        response = client.post(f"{url}/api/v1/search", json={"query": "q", "user_id": "u"})
        events = _events(app)
    assert response.status_code == 504, response.text
    detail = response.json()["detail"]
    assert detail["message"] == "every arm failed" and detail["request_id"] == events[0].id
    assert detail["failures"] == ["control: timed out (ReadTimeout)", "candidate: timed out (ReadTimeout)"]
    assert events[0].status == "error" and events[0].served_arm is None


def test_upstream_error_text_never_reaches_the_client_and_is_stored_redacted(tmp_path, client):
    key = "sk-live-THISISTHELLMAPIKEY0123456789"

    def echoing_gateway(request: httpx.Request) -> httpx.Response:
        # A gateway (or debug endpoint) that quotes the request it refused, Authorization header included.
        return httpx.Response(401, text=f"unauthorized: {request.headers['authorization']}")

    settings = _settings(tmp_path, "http://control.test/v1", "http://candidate.test/v1", 0.5, llm_api_key=key)
    with running_proxy(settings, upstream=httpx.MockTransport(echoing_gateway)) as (url, app):
        response = client.post(f"{url}/api/v1/search", json={"query": "q", "user_id": "u"})
        events = _events(app)
    assert response.status_code == 502, response.text
    assert key not in response.text and "unauthorized" not in response.text
    failures = response.json()["detail"]["failures"]
    assert sorted(failures) == ["candidate: HTTP 401 from the upstream", "control: HTTP 401 from the upstream"]
    # The operators keep the upstream's words, without the key.
    assert key not in events[0].error and events[0].error.count("unauthorized: Bearer ***") == 2


def test_control_down_falls_back_to_candidate(tmp_path, client, candidate_upstream):
    settings = _settings(tmp_path, dead_url(), candidate_upstream[1], 0.0)
    with running_proxy(settings) as (url, _app):
        response = client.post(f"{url}/api/v1/search", json={"query": "q", "user_id": "u"})
    assert response.status_code == 200
    assert response.json()["arm"] == "control" and response.json()["served_arm"] == "candidate"


def test_2000_concurrent_requests_make_exactly_2000_events(tmp_path, control_upstream, candidate_upstream):
    # 2,000 requests in one event loop queue behind each other: no client or upstream timeout that a
    # loaded machine could reach, so the test is about logging, not about speed (pytest-timeout bounds it).
    settings = _settings(tmp_path, control_upstream[1], candidate_upstream[1], 0.5, llm_timeout_s=3600)

    async def _fire(url: str) -> list[int]:
        limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
        async with httpx.AsyncClient(limits=limits, timeout=None) as client:
            responses = await asyncio.gather(
                *(client.post(f"{url}/api/v1/search", json={"query": f"q{i}", "user_id": f"u{i}"})
                  for i in range(2000))
            )
        return [r.status_code for r in responses]

    with running_proxy(settings) as (url, app):
        codes = asyncio.run(_fire(url))
        ids = {e.id for e in _events(app)}
    assert codes == [200] * 2000
    assert len(ids) == 2000
    db = Database(settings.database_url)
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(SearchEvent)) == 2000


def test_events_record_the_exact_prompt_and_template(tmp_path, client, control_upstream):
    with running_proxy(_settings(tmp_path, control_upstream[1])) as (url, app):
        body = client.post(f"{url}/api/v1/search", json={"query": "what is {context}?", "session_id": "s1"}).json()
        (event,) = _events(app)
    assert event.id == body["request_id"] and event.session_id == "s1"
    assert event.messages[0]["role"] == "system"
    assert event.messages[-1]["content"].endswith("Question: what is {context}?")
    assert event.prompt_template_version == 1 and event.prompt_template_id
    assert event.tokens_in == 10 and event.tokens_out == 5
    assert event.answer == "control says hi" and event.status == "ok"
    assert event.retrieved == {"ids": [], "scores": [], "index_version": None}


def test_feedback_on_a_recent_id_not_yet_visible_is_503_an_old_one_404(tmp_path, client, control_upstream):
    """Another replica may still hold a fresh event in its queue or spool: retry, do not lose the feedback."""
    import uuid
    from datetime import UTC, datetime, timedelta

    from store.models import id_time, new_id

    def v7_at(moment: datetime) -> str:
        return str(uuid.UUID(int=int(moment.timestamp() * 1000) << 80 | 0x7 << 76 | 0b10 << 62 | 12345))

    fresh = new_id()
    assert uuid.UUID(fresh).version == 7 and abs((id_time(fresh) - datetime.now(UTC)).total_seconds()) < 5
    old = v7_at(datetime.now(UTC) - timedelta(hours=1))
    settings = _settings(tmp_path, control_upstream[1], feedback_pending_window_s=300)
    with running_proxy(settings) as (url, _app):
        recent = client.post(f"{url}/api/v1/feedback", json={"request_id": fresh, "thumbs": "up"})
        stale = client.post(f"{url}/api/v1/feedback", json={"request_id": old, "thumbs": "up"})
        legacy = client.post(f"{url}/api/v1/feedback", json={"request_id": str(uuid.uuid4()), "thumbs": "up"})
    assert recent.status_code == 503 and recent.headers["retry-after"] == "2"
    assert recent.json()["detail"] == ("this request_id is recent and not in the store yet (another replica may "
                                       "still be writing it); retry shortly")
    assert stale.status_code == 404 and legacy.status_code == 404
    assert f"unknown request_id {old!r}" in stale.text


def test_feedback_finds_an_event_already_in_the_store_and_an_unreachable_store_is_503(
    tmp_path, client, control_upstream, monkeypatch
):
    from sqlalchemy.exc import OperationalError

    with running_proxy(_settings(tmp_path, control_upstream[1])) as (url, app):
        request_id = client.post(f"{url}/api/v1/search", json={"query": "q", "user_id": "u"}).json()["request_id"]
        _events(app)  # written: no longer in this replica's queue, only in the store
        assert not app.state.abloop.writer.is_pending(request_id)
        stored = client.post(f"{url}/api/v1/feedback", json={"request_id": request_id, "thumbs": "up"})

        def unreachable(db, event_id):
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

        monkeypatch.setattr("proxy.routes.search.event_exists", unreachable)
        dead = client.post(f"{url}/api/v1/feedback", json={"request_id": request_id, "thumbs": "down"})
    assert stored.status_code == 201, stored.text
    assert dead.status_code == 503 and dead.headers["retry-after"] == "2"
    assert dead.json()["detail"] == (
        "the store is unreachable and this request_id is not in this replica's queue; retry shortly")


def test_retrieved_passages_reach_the_answer_the_prompt_and_the_logged_event(tmp_path, client, control_upstream):
    # The retriever is faked for this unit (the real one, with real embeddings, is tests/proxy/test_retrieval_api.py,
    # marked slow): what the route does with its hits is the point here.
    from retrieval.grounding import passages_from_messages
    from retrieval.index import Hit

    hits = [Hit("id-1", "Lists", "doc:lists", 0.912345678, "Use append to add an item.", ("python",), "programming"),
            Hit("id-2", "Dicts", "doc:dicts", 0.5, "A dict maps keys to values.")]  # fmt: skip
    asked: list[tuple[str, int]] = []

    async def search(query: str, top_k: int):
        asked.append((query, top_k))
        await asyncio.sleep(0.025)  # so the retrieval time has a known floor: over 20 ms
        return hits

    with running_proxy(_settings(tmp_path, control_upstream[1])) as (url, app):
        app.state.abloop.retriever.search = search
        response = client.post(f"{url}/api/v1/search", json={"query": "how do I add to a list?", "top_k": 2})
        (event,) = _events(app)
    assert response.status_code == 200, response.text
    body = response.json()
    assert asked == [("how do I add to a list?", 2)]
    assert body["answer"] == "control says hi"
    assert body["items"] == [
        {"id": "id-1", "title": "Lists", "source": "doc:lists", "score": 0.912345678,
         "text": "Use append to add an item.", "tags": ["python"], "category": "programming"},
        {"id": "id-2", "title": "Dicts", "source": "doc:dicts", "score": 0.5, "text": "A dict maps keys to values.",
         "tags": [], "category": None},
    ]  # fmt: skip
    assert event.retrieved == {"ids": ["id-1", "id-2"], "scores": [0.912346, 0.5], "index_version": None}
    assert passages_from_messages(event.messages) == [hit.text for hit in hits]
    assert event.query == "how do I add to a list?" and event.answer == "control says hi"
    timings = body["timings_ms"]
    assert 20 <= timings["retrieval"] <= timings["total"] < 60_000 and timings["llm"] <= timings["total"]
    assert event.timings["total"] == pytest.approx(timings["total"], abs=1)


def test_feedback_finds_an_event_still_in_this_replicas_queue_at_once(tmp_path, client, control_upstream):
    # A flush interval far longer than the test: the event can only be found in the queue.
    settings = _settings(tmp_path, control_upstream[1], writer_flush_interval_s=600, feedback_pending_window_s=0)
    with running_proxy(settings) as (url, app):
        request_id = client.post(f"{url}/api/v1/search", json={"query": "q", "user_id": "u"}).json()["request_id"]
        assert app.state.abloop.writer.is_pending(request_id)
        given = client.post(f"{url}/api/v1/feedback", json={"request_id": request_id, "rating": 4})
    assert given.status_code == 201, given.text


def test_feedback_waits_once_for_an_event_another_replica_is_still_writing(
    tmp_path, client, control_upstream, monkeypatch
):
    """The store has the event 0.1 s after the feedback arrives (another replica's flush): found on the second look."""
    import time

    from store.models import new_id

    request_id, looks = new_id(), []

    def written_a_moment_later(db, event_id):
        looks.append(time.monotonic())
        return event_id == request_id and looks[-1] - looks[0] >= 0.1

    monkeypatch.setattr("proxy.routes.search.event_exists", written_a_moment_later)
    settings = _settings(tmp_path, control_upstream[1], feedback_pending_window_s=0)
    with running_proxy(settings) as (url, _app):
        given = client.post(f"{url}/api/v1/feedback", json={"request_id": request_id, "thumbs": "up"})
    assert given.status_code == 201, given.text
    assert len(looks) == 2


def test_a_format_rule_names_the_first_retrieved_passage(tmp_path, client, control_upstream):
    from retrieval.index import Hit
    from store import prompts

    async def search(query: str, top_k: int):
        return [Hit("id-1", "Lists", "doc:lists", 0.9, "Use append."),
                Hit("id-2", "Dicts", "doc:dicts", 0.5, "A dict.")]

    with running_proxy(_settings(tmp_path, control_upstream[1])) as (url, app):
        state = app.state.abloop
        prompts.new_version(state.db, system_prompt="Be brief.", template="{question}",
                            output_rules=[{"kind": "required_format", "text": "{answer}\nSource: {title}"}])
        on_app_loop(app, state.live.refresh())
        state.retriever.search = search
        body = client.post(f"{url}/api/v1/search", json={"query": "how do I add to a list?"}).json()
        (event,) = _events(app)
    assert body["answer"] == "control says hi\nSource: Lists"
    assert event.answer == body["answer"]  # the logged answer is the one the user read
