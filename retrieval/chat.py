"""One OpenAI-compatible chat endpoint, asked one question at a time: the client the LLM judge
(retrieval.judge) and document labelling (retrieval.metadata) share.

The API key goes only into the Authorization header; it is never part of an error message or a repr.
The proxy's calls to the arms are not made here: they stream, retry and fall back (proxy/upstream.py).
"""

from __future__ import annotations

from typing import Literal, Self

import httpx

# error: the call failed (transport, timeout, HTTP error status); invalid: it answered, but with no text.
Failure = Literal["error", "invalid"]
RAW_CHARS = 200  # how much of a bad reply an error message quotes


class ChatError(RuntimeError):
    """No text came back; `failure` says whether the call failed or its answer was unusable."""

    def __init__(self, failure: Failure, message: str) -> None:
        super().__init__(message)
        self.failure = failure


class ChatClient:
    """A system instruction and a prompt in, the reply's text out, at temperature 0."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout_s, headers=headers, transport=transport)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, model={self.model!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def complete(self, system: str, prompt: str, max_tokens: int) -> str:
        """The reply's text; raises ChatError, naming the endpoint and quoting what came back."""
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        try:
            response = self._client.post(self.url, json=body)
        except httpx.HTTPError as exc:
            raise ChatError("error", f"request to {self.url} failed: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise ChatError("error", f"{self.url} answered HTTP {response.status_code}: "
                                     f"{response.text[:RAW_CHARS]!r}")
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, LookupError, TypeError):
            raise ChatError("invalid", f"{self.url} sent no chat completion: {response.text[:RAW_CHARS]!r}") from None
        if not isinstance(content, str):
            raise ChatError("invalid", f"{self.url} sent no text content: {str(content)[:RAW_CHARS]!r}")
        return content
