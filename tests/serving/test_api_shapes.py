"""The model server's answers in OpenAI's shape, exactly: a stream's chunks, the error codes a client branches on,
the field named, Retry-After on a 503, an error in the middle of a stream. On the tiny random Llama behind the
real app (test_api.py has SmolLM2 behind it, through the `openai` client)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

QUESTION = [{"role": "user", "content": "Say hi."}]


@pytest.fixture
def serve():
    """`serve(engine)`: the app around that engine, under uvicorn; its base URL (…/v1) and root URL."""
    from serving.app import create_app
    from serving.server import ServerThread

    servers = []

    def start(engine):
        server = ServerThread(create_app(engine)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def tiny_engine(tiny_loaded):
    from serving.engine import Engine

    engine = Engine(tiny_loaded, max_batch=2)
    yield engine
    engine.stop()


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    [(key, error)] = response.json().items()
    assert key == "error" and set(error) == {"message", "type", "param", "code"}
    return error


def test_an_engine_given_to_the_app_is_started_and_left_running(serve, tiny_engine):
    assert not tiny_engine.running
    server = serve(tiny_engine)
    assert tiny_engine.running
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok", "model": tiny_engine.name, "queue": 0}
    server.stop()
    assert tiny_engine.running  # the caller's, to share between apps


def test_a_stopped_engine_is_503_with_retry_after(serve, tiny_engine):
    server = serve(tiny_engine)
    tiny_engine.stop()
    response = httpx.post(f"{server.base_url}/chat/completions", json={"model": tiny_engine.name, "messages": QUESTION})
    error = _error(response, 503)
    assert (error["type"], error["code"], response.headers["retry-after"]) == ("server_error", "engine_stopped", "1")
    health = httpx.get(f"{server.url}/healthz")
    assert _error(health, 503)["message"] == "the generation worker is not running"


@pytest.mark.parametrize(
    ("body", "status", "param", "code", "message"),
    [
        ({"messages": QUESTION}, 400, "model", "missing_field", "model: Field required"),
        ({"model": "m", "messages": QUESTION, "temperature": 3}, 400, "temperature", "invalid_value",
         "temperature: Input should be less than or equal to 2"),
        # Every field at fault is named, the first is `param`.
        ({"model": "m", "messages": QUESTION, "temperature": 3, "max_tokens": 0}, 400, "temperature",
         "invalid_value",
         "temperature: Input should be less than or equal to 2; "
         "max_tokens: Input should be greater than or equal to 1"),
        (None, 400, None, "missing_field", "the request body is required (a JSON object)"),
        (["a", "list"], 400, None, "invalid_value",
         "body: Input should be a valid dictionary or object to extract fields from"),
        ({"model": "no-such-model", "messages": QUESTION}, 404, "model", "model_not_found",
         "The model `no-such-model` does not exist."),
    ],
    ids=["missing", "out of range", "two at fault", "no body", "not an object", "unknown model"],
)
def test_refusals_name_the_field_and_the_code(serve, tiny_engine, body, status, param, code, message):
    server = serve(tiny_engine)
    error = _error(httpx.post(f"{server.base_url}/chat/completions", json=body), status)
    assert error == {"message": message, "type": "invalid_request_error", "param": param, "code": code}


def _stream(server, body: dict) -> tuple[httpx.Response, list[dict], str]:
    """The response, its JSON chunks, and the last data line."""
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    return r, [json.loads(d) for d in data[:-1]], data[-1]


def test_a_stream_is_openai_chunks_with_usage_last(serve, tiny_engine):
    server = serve(tiny_engine)
    response, chunks, last = _stream(server, {"model": tiny_engine.name, "messages": QUESTION, "max_tokens": 3,
                                              "stream_options": {"include_usage": True}})
    assert response.headers["content-type"].startswith("text/event-stream") and last == "[DONE]"
    *answer, usage = chunks
    [completion_id] = {c["id"] for c in chunks}
    assert completion_id.startswith("chatcmpl-")
    assert {(c["object"], c["model"]) for c in chunks} == {("chat.completion.chunk", tiny_engine.name)}
    assert len({c["created"] for c in chunks}) == 1 and isinstance(chunks[0]["created"], int)
    assert answer[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                     "logprobs": None}]
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in answer[1:-1])
    assert answer[-1]["choices"][0]["delta"] == {} and answer[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["usage"] is None for c in answer)  # include_usage: null until the last chunk
    assert usage["choices"] == [] and set(usage["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    counts = usage["usage"]
    assert 0 < counts["completion_tokens"] <= 3 and counts["prompt_tokens"] > 0
    assert counts["total_tokens"] == counts["prompt_tokens"] + counts["completion_tokens"]

    _, plain, _ = _stream(server, {"model": tiny_engine.name, "messages": QUESTION, "max_tokens": 2})
    assert all("usage" not in c for c in plain) and plain[-1]["choices"][0]["finish_reason"]


def test_a_failure_in_the_middle_of_a_stream_is_an_error_event_then_done(serve, tiny_engine, monkeypatch):
    server = serve(tiny_engine)
    runner, steps = tiny_engine._runner, []
    real_step = runner.step

    def fails_on_the_second_step(admitted):  # the first admits the request and gives its first token
        steps.append(len(admitted))
        if len(steps) == 2:
            raise RuntimeError("CUDA error: an illegal memory access")
        return real_step(admitted)

    monkeypatch.setattr(runner, "step", fails_on_the_second_step)
    response, chunks, last = _stream(server, {"model": tiny_engine.name, "messages": QUESTION, "max_tokens": 8})
    assert response.status_code == 200 and last == "[DONE]"  # the status was sent with the first chunk
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1] == {"error": {"message": "generation failed: RuntimeError: CUDA error: an illegal memory access",
                                    "type": "server_error", "param": None, "code": "generation_failed"}}


LETTERS_ONLY = "may hold only letters, digits, '_' and '-' (peft refuses '.' in an adapter name)"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a.b", f"lora_name 'a.b' {LETTERS_ONLY}"),
        ("Qwen2.5-0.5B-v1", f"lora_name 'Qwen2.5-0.5B-v1' {LETTERS_ONLY}"),
        ("my adapter", f"lora_name 'my adapter' {LETTERS_ONLY}"),
        ("x" * 129, "lora_name is 129 characters long; at most 128 are allowed"),
        ("__base__", "lora_name '__base__' is reserved; choose another name"),  # peft's "no adapter" row
        ("training", "lora_name 'training' is reserved; choose another name"),  # an nn.ModuleDict attribute
        ("keys", "lora_name 'keys' is reserved; choose another name"),
    ],
    ids=["dot", "dotted base name", "space", "too long", "peft's base", "module attribute", "dict method"],
)
def test_an_adapter_name_peft_cannot_hold_is_refused_up_front(serve, tiny_engine, tiny_adapter, name, message):
    # A dotted name reached peft, which failed half way and left its active adapter on the name: every later
    # request, base model included, was a 500 until a restart.
    server = serve(tiny_engine)
    body = {"lora_name": name, "lora_path": str(tiny_adapter)}
    error = _error(httpx.post(f"{server.base_url}/load_lora_adapter", json=body), 400)
    assert error == {"message": message, "type": "invalid_request_error", "param": "lora_name",
                     "code": "invalid_adapter"}
    assert tiny_engine.model_names() == [tiny_engine.name]


def test_the_prompt_is_tokenized_off_the_event_loop(serve, tiny_engine, monkeypatch):
    # Tokenizing a 10 MB prompt in the async handler held the server for 5 s: /health too.
    server = serve(tiny_engine)
    tokenizing, release = threading.Event(), threading.Event()
    encode = tiny_engine.encode_chat

    def slow_encode(messages):
        tokenizing.set()
        release.wait(10)
        return encode(messages)

    monkeypatch.setattr(tiny_engine, "encode_chat", slow_encode)
    body = {"model": tiny_engine.name, "messages": QUESTION, "max_tokens": 2}
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, f"{server.base_url}/chat/completions", json=body, timeout=30)
        assert tokenizing.wait(10)
        try:
            health = httpx.get(f"{server.url}/healthz", timeout=3)
        finally:
            release.set()
        assert health.status_code == 200
        assert answer.result().status_code == 200
