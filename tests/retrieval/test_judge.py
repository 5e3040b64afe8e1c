"""The LLM judge against a mocked OpenAI-compatible endpoint."""

from __future__ import annotations

import json

import httpx
import pytest

from retrieval.judge import JudgeError, LLMJudge

SECRET = "sk-test-secret-123"


def _judge(handler, **kwargs) -> LLMJudge:
    return LLMJudge("http://judge.test/v1/", "judge-model", transport=httpx.MockTransport(handler), **kwargs)


def _reply(content) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": content}}]})


def test_a_grade_becomes_a_score_and_the_request_carries_everything():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _reply("4")

    with _judge(handler, api_key=SECRET) as judge:
        score, detail = judge.score("How do I sort a list?", "Use sorted().", ["sorted() returns a new list.",
                                                                              "list.sort() sorts in place."])
    assert score == 0.75
    assert detail == {"raw": "4", "model": "judge-model", "grade": 4}
    (request,) = seen
    assert str(request.url) == "http://judge.test/v1/chat/completions"
    assert request.headers["Authorization"] == f"Bearer {SECRET}"
    body = json.loads(request.content)
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] <= 16
    prompt = "\n".join(m["content"] for m in body["messages"])
    for text in ("How do I sort a list?", "Use sorted().", "[1] sorted() returns a new list.",
                 "[2] list.sort() sorts in place.", "1 to 5"):
        assert text in prompt


@pytest.mark.parametrize(("reply", "score"), [("5", 1.0), ("1", 0.0), ("Grade: 3/5", 0.5), ("10, no: 2", 0.25),
                                             ("Grade (1-5): 4", 0.75), ("(1-5) 5", 1.0), ("Score 1 to 5: 2", 0.25),
                                             ("On a scale of 1–5, 3", 0.5), ("1", 0.0), ("1 - 2", 0.0)])
def test_the_first_grade_in_the_reply_counts(reply, score):
    assert _judge(lambda request: _reply(reply)).score("q", "a", ["p"])[0] == score


def test_no_key_sends_no_authorization_header():
    def handler(request: httpx.Request) -> httpx.Response:
        assert "Authorization" not in request.headers
        return _reply("3")

    assert _judge(handler).score("q", "a", [])[0] == 0.5


@pytest.mark.parametrize("response", [
    _reply("I cannot grade this."),
    _reply(None),
    httpx.Response(200, json={"error": "nope"}),
    httpx.Response(200, text="not json"),
    httpx.Response(500, text="upstream exploded"),
    httpx.Response(401, text="bad key"),
])
def test_unreadable_replies_and_http_errors_raise_a_judge_error_without_the_key(response):
    with pytest.raises(JudgeError) as raised:
        _judge(lambda request: response, api_key=SECRET).score("q", "a", ["p"])
    assert SECRET not in str(raised.value)


def test_transport_failures_raise_a_judge_error_without_the_key():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    judge = _judge(handler, api_key=SECRET)
    with pytest.raises(JudgeError, match="judge.test.*ConnectError") as raised:
        judge.score("q", "a", ["p"])
    assert SECRET not in str(raised.value) and SECRET not in repr(judge)


def test_a_server_error_names_the_status():
    with pytest.raises(JudgeError, match="HTTP 500"):
        _judge(lambda request: httpx.Response(500, text="boom")).score("q", "a", ["p"])


def test_the_rubric_goes_as_the_user_message_under_a_system_instruction():
    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return _reply("3")

    judge = _judge(handler)
    judge.score("What is a set?", "An unordered collection.", ["Sets hold unique items.", "Sets are mutable."])
    judge.score("What is a set?", "An unordered collection.", [])
    with_passages, without = (body["messages"] for body in bodies)
    assert [m["role"] for m in with_passages] == ["system", "user"]
    assert "single integer from 1 to 5" in with_passages[0]["content"]
    prompt = with_passages[1]["content"]
    assert prompt.startswith("Grade how well the answer is supported")
    assert prompt.endswith("Passages:\n[1] Sets hold unique items.\n\n[2] Sets are mutable.\n\n"
                           "Question: What is a set?\n\nAnswer: An unordered collection.\n\nGrade (1-5):")
    assert "Passages:\n(none)\n\nQuestion: What is a set?" in without[1]["content"]


@pytest.mark.parametrize(("reply", "score"), [("6, or rather 3", 0.5), ("0 then 4", 0.75)])
def test_numbers_outside_one_to_five_are_not_grades(reply, score):
    assert _judge(lambda request: _reply(reply)).score("q", "a", ["p"])[0] == score


def test_what_each_failure_says():
    with pytest.raises(JudgeError, match=r"judge 'judge-model' gave no grade 1-5: '6 out of 10'"):
        _judge(lambda request: _reply("6 out of 10")).score("q", "a", ["p"])
    url = "http://judge.test/v1/chat/completions"
    with pytest.raises(JudgeError) as raised:
        _judge(lambda request: httpx.Response(400, text="no")).score("q", "a", ["p"])
    assert str(raised.value) == f"judge: {url} answered HTTP 400: 'no'"
    with pytest.raises(JudgeError) as raised:
        _judge(lambda request: httpx.Response(200, text='{"choices": []}')).score("q", "a", ["p"])
    assert str(raised.value) == f"""judge: {url} sent no chat completion: '{{"choices": []}}'"""
    with pytest.raises(JudgeError) as raised:
        _judge(lambda request: _reply([1, 2])).score("q", "a", ["p"])
    assert str(raised.value) == f"judge: {url} sent no text content: '[1, 2]'"
    with pytest.raises(JudgeError) as raised:  # a long non-text content is cut, not echoed whole
        _judge(lambda request: _reply(["x" * 400])).score("q", "a", ["p"])
    quoted = repr(str(["x" * 400])[:200])  # the first 200 characters of the content as text
    assert str(raised.value) == f"judge: {url} sent no text content: {quoted}"


def test_the_timeout_applies_to_every_request():
    timeouts: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"])
        return _reply("5")

    _judge(handler, timeout_s=2.5).score("q", "a", ["p"])
    _judge(handler).score("q", "a", ["p"])
    assert timeouts == [dict.fromkeys(("connect", "read", "write", "pool"), 2.5),
                        dict.fromkeys(("connect", "read", "write", "pool"), 30.0)]
