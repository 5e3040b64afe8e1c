"""Every tuning variable the proxy reads reaches the part it tunes, from the environment, through `create_app`.

docs/CONFIGURATION.md lists them; each part has its own tests for what a value does, so here the question is
only whether the variable arrives: a setting that `create_app` forgot would leave its documented default in
force, silently. The upstream's three request settings and its connection cap are also checked by what the
model server receives.
"""

from __future__ import annotations

import asyncio
import json
from unittest import mock

import httpx
import pytest

from proxy.retriever import Retriever
from proxy.upstream import Upstream
from serving.stub import running_stub
from store.config import Settings
from store.writer import EventWriter
from tests.proxy.conftest import running_proxy

# Every value differs from its default (store/config.py), so a part built with the default fails the test.
TUNING = {
    "WRITER_BATCH_SIZE": "7",
    "WRITER_FLUSH_INTERVAL_S": "0.03",
    "EMBEDDING_MODEL": "/models/embedder-under-test",
    "EMBED_MAX_BATCH": "5",
    "EMBED_THREADS": "2",
    "EMBED_BACKEND": "torch",
    "EMBED_CACHE_SIZE": "11",
    "LLM_TIMEOUT_S": "4.5",
    "LLM_API_KEY": "sk-wiring-3f1c",
    "LLM_MAX_TOKENS": "77",
    "LLM_TEMPERATURE": "0.7",
    "CIRCUIT_FAILURE_THRESHOLD": "4",
    "CIRCUIT_RESET_S": "12",
    "UPSTREAM_MAX_CONNECTIONS": "3",
}


@pytest.fixture
def env_settings(tmp_path, monkeypatch):
    """Settings read from the environment as a deployment sets it: TUNING, plus a private store and paths."""

    def settings(**env: str) -> Settings:
        for name, value in {
            "DATABASE_URL": f"sqlite:///{tmp_path / 'abloop.db'}",
            "INDEX_DIR": str(tmp_path / "index"),
            "SPOOL_DIR": str(tmp_path / "spool"),
            "EXPERIMENT_REFRESH_S": "0.3",
            **TUNING,
            **env,
        }.items():
            monkeypatch.setenv(name, value)
        return Settings()

    return settings


def test_each_part_is_built_with_its_settings(env_settings, tmp_path):
    settings = env_settings()
    defaults = Settings.model_construct()
    assert all(getattr(settings, name.lower()) != getattr(defaults, name.lower()) for name in TUNING)
    built = {cls: mock.patch(f"proxy.app.{cls.__name__}", wraps=cls) for cls in (EventWriter, Retriever, Upstream)}
    with built[EventWriter] as writer, built[Retriever] as retriever, built[Upstream] as upstream, \
            running_proxy(settings):
        pass
    assert writer.call_args.args[1] == tmp_path / "spool"
    assert writer.call_args.kwargs == {"batch_size": 7, "flush_interval_s": 0.03}
    assert retriever.call_args.args == (tmp_path / "index", "/models/embedder-under-test")
    assert retriever.call_args.kwargs == {"max_batch": 5, "threads": 2, "backend": "torch", "cache_size": 11}
    assert upstream.call_args.kwargs == {
        "timeout_s": 4.5,
        "api_key": "sk-wiring-3f1c",
        "max_tokens": 77,
        "temperature": 0.7,
        "failure_threshold": 4,
        "reset_s": 12.0,
        "max_connections": 3,
    }


def test_the_model_server_is_asked_with_the_configured_key_temperature_and_max_tokens(env_settings, client):
    seen: list[httpx.Request] = []

    def model_server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"choices": [{"message": {"content": "an answer"}}]})

    settings = env_settings(LLM_API_BASE="http://model.test/v1")
    with running_proxy(settings, upstream=httpx.MockTransport(model_server)) as (url, _app):
        response = client.post(f"{url}/api/v1/search", json={"query": "what is a list?", "user_id": "u-1"})
    assert response.status_code == 200, response.text
    [call] = seen
    body = json.loads(call.content)
    assert (body["temperature"], body["max_tokens"]) == (0.7, 77)
    assert call.headers["authorization"] == "Bearer sk-wiring-3f1c"


def test_upstream_max_connections_caps_the_connections_to_the_model_server(env_settings):
    """Nine searches at once, each answer 0.2 s late: three connections carry them all, none is refused."""

    async def searches(url: str) -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            responses = await asyncio.gather(*(
                client.post(f"{url}/api/v1/search", json={"query": f"question {i}", "user_id": f"u-{i}"})
                for i in range(9)
            ))
        return [response.status_code for response in responses]

    with running_stub(model="control-model", delay_s=0.2) as (stub, stub_url), \
            running_proxy(env_settings(LLM_API_BASE=stub_url)) as (url, _app):
        statuses = asyncio.run(searches(url))
    assert statuses == [200] * 9
    assert stub.requests == 9
    assert stub.peak_connections == 3  # the cap, and reached: the searches did run side by side
