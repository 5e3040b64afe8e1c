"""The proxy's JSON log lines, its spans and the W3C trace context it passes to the upstream arms (issue 14).

Real app under uvicorn, real store; only the arms' servers are faked (httpx.MockTransport, which also records
the headers each upstream call carried).
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from sqlalchemy import select

from experiment.assignment import bucket
from retrieval.corpus import Document
from store import tracing
from store.db import Database
from store.models import SearchEvent
from tests.proxy.conftest import make_settings, running_proxy
from tests.store.test_logs import captured_logs, records

USER, OTHER_USER = "user-7f3a9c", "user-b21e04"
API_KEY = "upstream-key-5d0c7e1a"
COMMENT = "the comment text stays out of the logs"
FAIL = "PLEASE-FAIL"  # a query with this in it makes the candidate arm answer 500
CALLER_TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


@pytest.fixture(scope="module")
def index_documents():
    return [
        Document("Lists", "doc:lists", "A list is a mutable sequence. Use append to add an item to a list."),
        Document("Files", "doc:files", "Open a file with open(path), and close it, or use a with statement."),
    ]


def _settings(tmp_path, **overrides):
    values = {
        "llm_api_base": "http://control.test/v1",
        "llm_model": "control-model",
        "llm_api_base_new_model": "http://candidate.test/v1",
        "llm_model_new": "candidate-model",
        "candidate_share": 1.0,  # every user with an id is assigned the candidate
        "llm_api_key": API_KEY,
    }
    return make_settings(tmp_path, **{**values, **overrides})


def _arms(seen: list[httpx.Request]) -> httpx.MockTransport:
    """Both arms' servers: answer, except the candidate for a query with FAIL in it (and both for FAIL-ALL)."""

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = json.loads(request.content)
        query = body["messages"][-1]["content"]
        if f"{FAIL}-ALL" in query or (FAIL in query and request.url.host == "candidate.test"):
            return httpx.Response(500, text="the arm broke")
        return httpx.Response(200, json={"model": body["model"], "choices": [{"message": {"content": "hi"}}],
                                          "usage": {"prompt_tokens": 7, "completion_tokens": 2}})

    return httpx.MockTransport(answer)


def _events(settings) -> dict[str, SearchEvent]:
    db = Database(settings.database_url)
    try:
        with db.session() as session:
            return {event.id: event for event in session.scalars(select(SearchEvent))}
    finally:
        db.dispose()


def _search(client: httpx.Client, url: str, query: str, user_id: str | None = None, **headers: str) -> dict:
    response = client.post(f"{url}/api/v1/search", json={"query": query, "user_id": user_id}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_search_fallback_and_feedback_each_log_their_line(tmp_path, client):
    settings = _settings(tmp_path)
    seen: list[httpx.Request] = []
    with captured_logs(secrets=settings.secret_values()) as lines:
        with running_proxy(settings, upstream=_arms(seen)) as (url, app):
            experiment = app.state.abloop.live.snapshot.experiment
            answered = _search(client, url, "what is a list?", USER)
            fell_back = _search(client, url, f"{FAIL} how do I open a file?", OTHER_USER)
            feedback = client.post(f"{url}/api/v1/feedback", json={
                "request_id": answered["request_id"], "thumbs": "up", "comment": COMMENT})
            assert feedback.status_code == 201, feedback.text
            unknown_id = str(uuid.uuid4())
            unknown = client.post(f"{url}/api/v1/feedback", json={"request_id": unknown_id, "rating": 5})
            assert unknown.status_code == 404
        text = "\n".join(lines())
    out = records(lines())  # every line is one JSON object

    by_request = {r["request_id"]: r for r in out if r["message"] == "search answered"}
    assert set(by_request) == {answered["request_id"], fell_back["request_id"]}
    ok = by_request[answered["request_id"]]
    assert ok["level"] == "INFO" and ok["logger"] == "abloop.proxy"
    assert {key: ok[key] for key in ("experiment_id", "arm", "served_arm", "bucket", "status", "model",
                                     "http_status")} == {
        "experiment_id": experiment.id, "arm": "candidate", "served_arm": "candidate",
        "bucket": bucket(experiment.salt, USER), "status": "ok", "model": "candidate-model", "http_status": 200}
    assert set(ok["timings_ms"]) == {"retrieval", "llm", "total"}
    assert 0 <= ok["timings_ms"]["llm"] <= ok["timings_ms"]["total"]
    assert ok["timings_ms"] == pytest.approx(answered["timings_ms"], abs=1e-3)

    fallback = by_request[fell_back["request_id"]]
    assert (fallback["arm"], fallback["served_arm"], fallback["status"], fallback["model"]) == (
        "candidate", "control", "fallback", "control-model")
    (warning,) = [r for r in out if r["message"] == "search fell back to the other arm"]
    assert warning["level"] == "WARNING" and warning["request_id"] == fell_back["request_id"]
    assert warning["served_arm"] == "control"
    assert warning["reason"].startswith("candidate: HTTP 500")

    (given,) = [r for r in out if r["message"] == "feedback received"]
    assert {key: given[key] for key in ("request_id", "feedback_id", "thumbs", "rating", "correction", "comment")} == {
        "request_id": answered["request_id"], "feedback_id": feedback.json()["feedback_id"], "thumbs": "up",
        "rating": None, "correction": False, "comment": True}

    (refused,) = [r for r in out if r["message"] == "request failed"]
    assert {key: refused[key] for key in ("level", "http_status", "method", "path", "request_id")} == {
        "level": "INFO", "http_status": 404, "method": "POST", "path": "/api/v1/feedback", "request_id": unknown_id}

    # The raw user ids, the comment, the upstream key and the admin token appear nowhere.
    assert seen[0].headers["authorization"] == f"Bearer {API_KEY}"  # the key was in play
    for absent in (USER, OTHER_USER, COMMENT, API_KEY, settings.admin_token.get_secret_value()):
        assert absent not in text
    # Export off and no caller's trace: nothing to pass on, nothing stored.
    assert not any("traceparent" in request.headers for request in seen)
    assert {event.trace_id for event in _events(settings).values()} == {None}


def test_log_user_id_and_a_failed_search(tmp_path, client):
    settings = _settings(tmp_path, log_user_id=True)
    with captured_logs() as lines:
        with running_proxy(settings, upstream=_arms([])) as (url, _app):
            response = client.post(f"{url}/api/v1/search", json={"query": f"{FAIL}-ALL", "user_id": USER})
            assert response.status_code == 502
        out = records(lines())
    request_id = response.json()["detail"]["request_id"]
    (failed,) = [r for r in out if r["message"] == "search failed"]
    assert (failed["level"], failed["request_id"], failed["user_id"], failed["status"], failed["http_status"]) == (
        "WARNING", request_id, USER, "error", 502)
    assert "bucket" not in failed and failed["served_arm"] is None
    assert "candidate: HTTP 500" in failed["reason"] and "control: HTTP 500" in failed["reason"]
    (refused,) = [r for r in out if r["message"] == "request failed"]
    assert (refused["level"], refused["http_status"], refused["request_id"]) == ("WARNING", 502, request_id)


def test_at_warning_level_a_failed_search_and_a_fallback_are_logged_an_answer_is_not(tmp_path, client):
    settings = _settings(tmp_path)
    with captured_logs(level="WARNING") as lines:
        with running_proxy(settings, upstream=_arms([])) as (url, _app):
            _search(client, url, "what is a list?", USER)
            fell_back = _search(client, url, f"{FAIL} how do I open a file?", USER)
            assert client.post(f"{url}/api/v1/search", json={"query": f"{FAIL}-ALL"}).status_code == 502
        out = records(lines())
    searches = [r["message"] for r in out if r["message"].startswith("search")]
    assert searches == ["search fell back to the other arm", "search failed"]
    assert out[-1]["message"] == "request failed" and out[-2].get("bucket") is None  # the failure had no user id
    assert out[[r["message"] for r in out].index("search fell back to the other arm")]["request_id"] == (
        fell_back["request_id"])


def _samples(metrics_text: str) -> dict[str, float]:
    """Prometheus text format: every sample by its name and labels."""
    return {series: float(value) for series, value in (
        line.rsplit(" ", 1) for line in metrics_text.splitlines() if line and not line.startswith("#"))}


def test_each_outcome_is_counted_by_assigned_and_served_arm_and_latencies_are_in_seconds(tmp_path, client):
    settings = _settings(tmp_path)
    with running_proxy(settings, upstream=_arms([])) as (url, _app):
        answered = _search(client, url, "what is a list?", USER)
        _search(client, url, f"{FAIL} how do I open a file?", OTHER_USER)
        assert client.post(f"{url}/api/v1/search", json={"query": f"{FAIL}-ALL", "user_id": USER}).status_code == 502
        for given in ({"rating": 4}, {"thumbs": "up", "corrected_answer": "use append"}, {"thumbs": "down"}):
            response = client.post(f"{url}/api/v1/feedback", json={"request_id": answered["request_id"], **given})
            assert response.status_code == 201, response.text
        samples = _samples(client.get(f"{url}/metrics").text)
    counted = {series: value for series, value in samples.items() if series.startswith((
        "abloop_search_requests_total", "abloop_search_fallbacks_total", "abloop_upstream_errors_total",
        "abloop_tokens_total", "abloop_llm_latency_seconds_count", "abloop_search_latency_seconds_count",
        "abloop_feedback_total"))}
    assert counted == {
        'abloop_search_requests_total{arm="candidate",served_arm="candidate",status="ok"}': 1.0,
        'abloop_search_requests_total{arm="candidate",served_arm="control",status="fallback"}': 1.0,
        'abloop_search_requests_total{arm="candidate",served_arm="none",status="error"}': 1.0,
        'abloop_search_fallbacks_total{arm="candidate"}': 1.0,
        'abloop_upstream_errors_total{arm="candidate"}': 2.0,  # the fallback's first try, and the failure's
        'abloop_upstream_errors_total{arm="control"}': 1.0,
        'abloop_tokens_total{arm="candidate",direction="in"}': 14.0,  # by the assigned arm, fallback included
        'abloop_tokens_total{arm="candidate",direction="out"}': 4.0,
        'abloop_llm_latency_seconds_count{served_arm="candidate"}': 1.0,
        'abloop_llm_latency_seconds_count{served_arm="control"}': 1.0,
        'abloop_search_latency_seconds_count{arm="candidate"}': 3.0,
        'abloop_feedback_total{kind="rating"}': 1.0,
        'abloop_feedback_total{kind="thumbs_up"}': 1.0,
        'abloop_feedback_total{kind="thumbs_down"}': 1.0,
        'abloop_feedback_total{kind="correction"}': 1.0,
    }
    # The histograms hold seconds: the logged events' milliseconds, over a thousand.
    timings = [event.timings for event in _events(settings).values()]
    assert samples['abloop_search_latency_seconds_sum{arm="candidate"}'] == pytest.approx(
        sum(t["total"] for t in timings) / 1000)
    assert samples["abloop_retrieval_latency_seconds_sum"] == pytest.approx(sum(t["retrieval"] for t in timings) / 1000)
    assert samples['abloop_llm_latency_seconds_sum{served_arm="candidate"}'] + samples[
        'abloop_llm_latency_seconds_sum{served_arm="control"}'] == pytest.approx(
        sum(t["llm"] for t in timings if t["llm"] is not None) / 1000)


@pytest.mark.slow
def test_search_spans_nest_under_the_request_and_the_trace_reaches_the_upstream(
    tmp_path, index_dir, span_exporter, client
):
    settings = _settings(tmp_path, index_dir=index_dir)
    seen: list[httpx.Request] = []
    with captured_logs() as lines:
        with running_proxy(settings, upstream=_arms(seen)) as (url, app):
            index_version = app.state.abloop.retriever.version
            fell_back = _search(client, url, f"{FAIL} how do I add to a list?", USER)
            joined = _search(client, url, "how do I add to a list?", OTHER_USER, traceparent=CALLER_TRACEPARENT)
            assert client.get(f"{url}/healthz").status_code == 200  # a probe: no span
            assert client.post(f"{url}/api/v1/search", json={"query": ""}).status_code == 422
            assert client.post(f"{url}/api/v1/search", json={"query": f"{FAIL}-ALL"}).status_code == 502
        out = records(lines())
    # The server has stopped: every request's spans have ended.
    spans = span_exporter.get_finished_spans()
    servers = [s for s in spans if s.kind.name == "SERVER"]
    assert len(servers) == 4
    first, second, refused, failed = sorted(servers, key=lambda s: s.start_time)

    # One request span each, named and attributed after OpenTelemetry's HTTP conventions.
    assert first.name == "POST /api/v1/search" and first.status.status_code.name == "UNSET"
    assert {key: first.attributes[key] for key in first.attributes} == {
        "http.request.method": "POST", "url.path": "/api/v1/search", "url.scheme": "http",
        "network.protocol.version": "1.1", "http.route": "/api/v1/search", "http.response.status_code": 200}
    assert (refused.name, refused.attributes["http.response.status_code"]) == ("POST /api/v1/search", 422)
    assert refused.status.status_code.name == "UNSET"  # a client's error is not the server's
    assert (failed.attributes["http.response.status_code"], failed.status.status_code.name) == (502, "ERROR")

    assert first.parent is None  # no caller's trace: the request span is the root
    children = sorted((s for s in spans if s.parent and s.parent.span_id == first.context.span_id),
                      key=lambda s: s.start_time)
    assert [s.name for s in children] == ["embed query", "faiss search", "upstream call", "upstream call",
                                          "store enqueue"]
    assert all(s.context.trace_id == first.context.trace_id for s in children)
    assert dict(children[1].attributes) == {"abloop.top_k": 5, "abloop.index_version": index_version}
    candidate_call, control_call = children[2], children[3]
    assert {key: candidate_call.attributes[key] for key in candidate_call.attributes} == {
        "abloop.arm": "candidate", "abloop.model": "candidate-model", "abloop.fallback": False,
        "server.address": "candidate.test", "abloop.status": "error"}
    assert candidate_call.status.status_code.name == "ERROR"
    assert (control_call.attributes["abloop.arm"], control_call.attributes["abloop.fallback"],
            control_call.attributes["abloop.status"]) == ("control", True, "ok")

    # Each upstream call carried its own span as the parent, in the request's trace; the store has the trace id.
    trace_id = format(first.context.trace_id, "032x")
    assert [request.headers["traceparent"] for request in seen[:2]] == [
        f"00-{trace_id}-{call.context.span_id:016x}-{call.context.trace_flags:02x}"
        for call in (candidate_call, control_call)]
    events = _events(settings)
    assert events[fell_back["request_id"]].trace_id == trace_id
    (line,) = [r for r in out if r["message"] == "search answered" and r["request_id"] == fell_back["request_id"]]
    assert line["trace_id"] == trace_id

    # A caller's traceparent: the request span is its child, and the upstream call stays in the caller's trace.
    assert format(second.context.trace_id, "032x") == CALLER_TRACE
    assert second.parent.is_remote and format(second.parent.span_id, "016x") == CALLER_SPAN
    assert seen[2].headers["traceparent"].startswith(f"00-{CALLER_TRACE}-")
    assert events[joined["request_id"]].trace_id == CALLER_TRACE


def test_an_incoming_traceparent_reaches_the_upstream_with_export_off(tmp_path, client):
    assert not tracing.is_enabled()
    settings = _settings(tmp_path)
    seen: list[httpx.Request] = []
    with captured_logs() as lines:
        with running_proxy(settings, upstream=_arms(seen)) as (url, _app):
            joined = _search(client, url, "what is a list?", USER, traceparent=CALLER_TRACEPARENT)
            alone = _search(client, url, "what is a list?", USER)
        out = records(lines())
    # No span of our own: the caller's context goes on as it came.
    assert seen[0].headers["traceparent"] == CALLER_TRACEPARENT
    assert "traceparent" not in seen[1].headers
    events = _events(settings)
    assert (events[joined["request_id"]].trace_id, events[alone["request_id"]].trace_id) == (CALLER_TRACE, None)
    answered = {r["request_id"]: r for r in out if r["message"] == "search answered"}
    assert (answered[joined["request_id"]]["trace_id"], answered[joined["request_id"]]["span_id"]) == (
        CALLER_TRACE, CALLER_SPAN)
    assert "trace_id" not in answered[alone["request_id"]]
