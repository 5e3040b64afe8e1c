"""The model server's share of a trace (its span joins the caller's `traceparent`) and its one log line per
completion, on the session's real server and model (tests/serving/conftest.py)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.store.test_logs import captured_logs, records

pytestmark = pytest.mark.slow

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"
QUESTION = [{"role": "user", "content": "Name one colour."}]


def _complete(server, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": QUESTION, "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(f"{server.base_url}/chat/completions", json=body, headers={"traceparent": TRACEPARENT},
                      timeout=120)


def _completion_lines(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line["logger"] == "serving.completions" and "request_id" in line]


def test_a_completion_is_a_span_in_the_callers_trace_and_one_json_line(span_exporter, engine, model_name):
    from serving.app import create_app
    from serving.server import ServerThread

    # An app built once tracing is on, as `abloop serve-model` builds it: FastAPI then adds its request span.
    with ServerThread(create_app(engine)) as server, captured_logs() as lines:
        response = _complete(server, model_name)
        written = records(lines())
    assert response.status_code == 200
    answer = response.json()

    spans = {s.context.span_id: s for s in span_exporter.get_finished_spans()}
    [span] = [s for s in spans.values() if s.name == "chat completion"]
    top = span
    while top.parent is not None and top.parent.span_id in spans:  # up through FastAPI's spans, if any
        top = spans[top.parent.span_id]
    assert format(top.parent.span_id, "016x") == CALLER_SPAN_ID and top.parent.is_remote
    assert {format(s.context.trace_id, "032x") for s in spans.values()} == {TRACE_ID}
    assert span.attributes["gen_ai.response.id"] == answer["id"]
    assert span.attributes["gen_ai.request.model"] == model_name
    assert span.attributes["serving.prompt_tokens"] == answer["usage"]["prompt_tokens"]
    assert span.attributes["serving.completion_tokens"] == answer["usage"]["completion_tokens"]
    assert span.attributes["serving.queue_wait_ms"] >= 0
    assert span.attributes["http.response.status_code"] == 200

    [line] = _completion_lines(written)
    assert line["message"] == "chat completion" and line["level"] == "INFO"
    assert line["request_id"] == answer["id"]
    assert line["model"] == model_name and "adapter" not in line  # the base model
    assert line["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    assert line["completion_tokens"] == answer["usage"]["completion_tokens"]
    assert line["finish_reason"] == answer["choices"][0]["finish_reason"]
    assert line["status"] == 200 and line["stream"] is False
    assert line["queue_wait_ms"] >= 0 and line["generation_ms"] > 0
    assert (line["trace_id"], line["span_id"]) == (TRACE_ID, format(span.context.span_id, "016x"))


def test_with_tracing_off_the_line_carries_the_callers_trace(server, model_name):
    with captured_logs() as lines:
        streamed = _complete(server, model_name, stream=True)
        unknown = _complete(server, "no-such-model")
        written = records(lines())
    assert streamed.status_code == 200 and unknown.status_code == 404
    stream_id = json.loads(streamed.text.split("\n\n")[0].removeprefix("data: "))["id"]

    by_status = {line["status"]: line for line in _completion_lines(written)}
    assert set(by_status) == {200, 404}
    ok, missing = by_status[200], by_status[404]
    assert ok["request_id"] == stream_id and ok["stream"] is True and ok["completion_tokens"] > 0
    assert missing["level"] == "WARNING" and missing["model"] == "no-such-model"
    assert missing["error"] == unknown.json()["error"]["message"]
    for line in (ok, missing):
        assert (line["trace_id"], line["span_id"]) == (TRACE_ID, CALLER_SPAN_ID)
