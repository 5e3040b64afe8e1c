"""The OpenAI-compatible API through the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest
from openai import OpenAI

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=120)


def test_chat_completion_with_openai_client(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=16, temperature=0)
    assert r.object == "chat.completion"
    assert r.model == model_name
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_usage_counts_are_tokenizer_counts(client, model_name, engine):
    r = client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=6, temperature=0)
    assert r.usage.prompt_tokens == len(engine.encode_chat(QUESTION))
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    # the text is what those 6 tokens decode to
    assert engine.count_tokens(r.choices[0].message.content) in (5, 6, 7)


def test_stream_concatenates_to_the_same_text(client, model_name):
    plain = client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model=model_name,
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_stream_wire_format_ends_with_done(server, model_name):
    body = {"model": model_name, "messages": QUESTION, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert '"object":"chat.completion.chunk"' in lines[0]


def test_max_tokens_and_stop_strings(client, model_name):
    free = client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=24, temperature=0)
    text = free.choices[0].message.content
    words = text.split()
    assert len(words) >= 4, text
    stop = " " + words[2]  # cut before the third word
    cut = client.chat.completions.create(
        model=model_name, messages=QUESTION, max_tokens=24, temperature=0, stop=[stop, "never-in-text"]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.usage.completion_tokens < free.usage.completion_tokens
    # a single string works too, and streaming never leaks the stop string
    stream = client.chat.completions.create(
        model=model_name, messages=QUESTION, max_tokens=24, temperature=0, stop=stop, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == text[: text.index(stop)]
    # max_tokens
    short = client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    newer = client.chat.completions.create(
        model=model_name, messages=QUESTION, max_completion_tokens=2, temperature=0
    )
    assert newer.usage.completion_tokens == 2


def test_seed_makes_sampling_reproducible(client, model_name):
    def sample(seed):
        return client.chat.completions.create(
            model=model_name, messages=QUESTION, max_tokens=12, temperature=1.0, top_p=0.95, seed=seed
        ).choices[0].message.content

    assert sample(1234) == sample(1234)
    # ...and the seed is really used: other seeds give other samples (if the seed or the temperature
    # were ignored, all three would be the same text).
    assert len({sample(1234), sample(4321), sample(99)}) > 1


def test_models_health_and_stats(client, server, model_name):
    ids = [m.id for m in client.models.list()]
    assert model_name in ids
    assert client.models.retrieve(model_name).id == model_name
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    before = httpx.get(f"{server.url}/stats").json()
    client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=3, temperature=0)
    after = httpx.get(f"{server.url}/stats").json()
    assert after["max_batch"] == 16
    assert after["completed"] == before["completed"] + 1 and after["requests"] == before["requests"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] in (1, 2, 3)  # max_tokens, or EOS earlier


def _assert_error_shape(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def test_unknown_model_is_404_in_openai_shape(server, client):
    r = httpx.post(
        f"{server.base_url}/chat/completions", json={"model": "no-such-model", "messages": QUESTION}
    )
    err = _assert_error_shape(r, 404)
    assert err["code"] == "model_not_found" and "no-such-model" in err["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    _assert_error_shape(httpx.get(f"{server.base_url}/models/no-such-model"), 404)
    _assert_error_shape(httpx.get(f"{server.url}/no/such/route"), 404)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": QUESTION}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": QUESTION, "temperature": "hot"}, "temperature"),
        ({"model": "m", "messages": QUESTION, "temperature": 3}, "temperature"),
        ({"model": "m", "messages": QUESTION, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": QUESTION, "n": 2}, "n"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": "m", "messages": QUESTION, "stop": [""]}, "stop"),
        # strict types, as OpenAI's API: a string is no number, and "yes" no boolean
        ({"model": "m", "messages": QUESTION, "max_tokens": "5"}, "max_tokens"),
        ({"model": "m", "messages": QUESTION, "temperature": "0.5"}, "temperature"),
        ({"model": "m", "messages": QUESTION, "stream": "yes"}, "stream"),
        ({"model": "m", "messages": QUESTION, "stream": True, "stream_options": {"include_usage": "true"}},
         "stream_options"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(server, body, field):
    err = _assert_error_shape(httpx.post(f"{server.base_url}/chat/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"].startswith(field)
    assert field in err["message"]


def test_a_prompt_past_the_context_is_400_context_length_exceeded(server, client, model_name):
    """What vLLM and OpenAI answer: refused before any generation, the code a client can act on."""
    long = [{"role": "user", "content": "sea " * 9000}]  # past SmolLM2's 8,192 tokens
    r = httpx.post(f"{server.base_url}/chat/completions", json={"model": model_name, "messages": long}, timeout=120)
    err = _assert_error_shape(r, 400)
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "context_length_exceeded", "messages")
    assert re.fullmatch(r"The prompt has \d{4,} tokens; this model's context is 8192 tokens\.", err["message"])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_name, messages=long)


def test_malformed_json_is_400(server):
    r = httpx.post(
        f"{server.base_url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    err = _assert_error_shape(r, 400)
    assert "JSON" in err["message"]


def test_client_going_away_stops_its_generation(server, model_name, engine):
    body = {"model": model_name, "messages": QUESTION, "max_tokens": 200, "temperature": 0, "stream": True}
    completed = engine.stats.completed
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 30
    while engine.active_rows and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.active_rows == 0
    assert engine.stats.completed == completed  # dropped, not run to its 200 tokens
