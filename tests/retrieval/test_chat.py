"""retrieval.chat: the one OpenAI-compatible chat call the judge and the document labeller share."""

import httpx
import pytest

from retrieval.chat import RAW_CHARS, ChatClient, ChatError

URL = "http://llm.test/v1/chat/completions"


def _client(reply: httpx.Response) -> ChatClient:
    return ChatClient("http://llm.test/v1/", "m", transport=httpx.MockTransport(lambda request: reply))


@pytest.mark.parametrize("body", ['[{"choices": []}]', '{"choices": null}', '{"choices": [{"message": "hi"}]}'])
def test_json_of_another_shape_is_no_chat_completion(body):
    with _client(httpx.Response(200, text=body)) as client, pytest.raises(ChatError) as raised:
        client.complete("system", "prompt", 5)
    assert raised.value.failure == "invalid"
    assert str(raised.value) == f"{URL} sent no chat completion: {body!r}"


def test_a_long_reply_is_quoted_up_to_its_first_characters():
    body = "<html>" + "x" * 1000
    with _client(httpx.Response(200, text=body)) as client, pytest.raises(ChatError) as raised:
        client.complete("system", "prompt", 5)
    assert str(raised.value) == f"{URL} sent no chat completion: {body[:RAW_CHARS]!r}"
    with _client(httpx.Response(503, text=body)) as client, pytest.raises(ChatError) as raised:
        client.complete("system", "prompt", 5)
    assert (raised.value.failure, str(raised.value)) == ("error", f"{URL} answered HTTP 503: {body[:RAW_CHARS]!r}")
    assert RAW_CHARS == 200


def test_the_key_goes_in_the_header_only():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"choices": [{"message": {"content": "ok"}}]})

    with ChatClient("http://llm.test/v1", "m", api_key="sk-secret", transport=httpx.MockTransport(handler)) as client:
        assert client.complete("system", "prompt", 5) == "ok"
        assert "sk-secret" not in repr(client)
    assert seen[0].headers["authorization"] == "Bearer sk-secret" and b"sk-secret" not in seen[0].content
