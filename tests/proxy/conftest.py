from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
from fastapi import FastAPI

from proxy.app import create_app
from proxy.deps import get_fetch
from proxy.upstream import Upstream
from retrieval.fetch import fetch_url
from serving.stub import running_stub
from store.config import Settings
from tests.conftest import free_port, serve_app

ADMIN_TOKEN = "test-admin-token"
REDIS_URL = os.environ.get("ABLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class Clock:
    """A monotonic clock a test moves by hand (`clock.now += 10`): for breakers and buckets, without sleeping."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def control_upstream():
    with running_stub(model="control-model", answer="control says hi") as (stub, url):
        yield stub, url


@pytest.fixture(scope="module")
def candidate_upstream():
    with running_stub(model="candidate-model", answer="candidate says hi") as (stub, url):
        yield stub, url


@pytest.fixture
def redis_prefix():
    """A key prefix of this test's own in the real Redis; its keys are deleted afterwards."""
    import redis

    server = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        server.ping()
    except redis.RedisError as error:
        pytest.skip(f"no Redis at {REDIS_URL} (set ABLOOP_TEST_REDIS_URL): {error}")
    prefix = f"abloop-test:{uuid.uuid4().hex}:"
    yield server, prefix
    keys = list(server.scan_iter(match=prefix + "*"))
    if keys:
        server.delete(*keys)
    server.close()


def dead_url() -> str:
    """A loopback port nobody listens on: connections are refused at once."""
    return f"http://127.0.0.1:{free_port()}/v1"


def make_settings(tmp_path: Path, **overrides) -> Settings:
    values = {
        "database_url": f"sqlite:///{tmp_path / 'abloop.db'}",
        "index_dir": tmp_path / "index",
        "spool_dir": tmp_path / "spool",
        "admin_token": ADMIN_TOKEN,
        "experiment_refresh_s": 0.3,
        "writer_flush_interval_s": 0.02,
        "llm_timeout_s": 5,
    }
    values.update(overrides)
    return Settings(**values)


@contextmanager
def proxy_app(
    settings: Settings,
    *,
    upstream: httpx.AsyncBaseTransport | None = None,
    dependency_overrides: dict[Any, Any] | None = None,
) -> Iterator[FastAPI]:
    """The proxy app, not yet started. `upstream` answers its LLM calls in place of the network (the
    lifespan's Upstream is built with it while this block runs); `dependency_overrides` go to FastAPI's
    own, e.g. `fake_web(...)`."""
    app = create_app(settings)
    app.dependency_overrides.update(dependency_overrides or {})
    faked = mock.patch("proxy.app.Upstream", partial(Upstream, transport=upstream)) if upstream else nullcontext()
    with faked:
        yield app


@contextmanager
def running_proxy(settings: Settings, **fakes: Any) -> Iterator[tuple[str, FastAPI]]:
    """The proxy under uvicorn, with `proxy_app`'s fakes; yields its base URL and the app."""
    with proxy_app(settings, **fakes) as app, serve_app(app) as url:
        yield url, app


def on_app_loop(app: FastAPI, coroutine) -> Any:
    """Run `coroutine` on the running proxy's event loop (its writer and live state live there); its result."""
    return asyncio.run_coroutine_threadsafe(coroutine, app.state.abloop.live._task.get_loop()).result(30)


def fake_llm() -> httpx.MockTransport:
    """An OpenAI-compatible upstream for every arm that always answers "<model> says hi"."""

    def answer(request: httpx.Request) -> httpx.Response:
        model = json.loads(request.content)["model"]
        return httpx.Response(200, json={"model": model, "choices": [{"message": {"content": f"{model} says hi"}}]})

    return httpx.MockTransport(answer)


async def public_resolver(_host: str, _port: int) -> list[str]:
    """Every host name resolves to one public address (example.com's), so the SSRF guard lets it through."""
    return ["93.184.216.34"]


def fake_web(transport: httpx.AsyncBaseTransport, resolver=public_resolver) -> dict[Any, Any]:
    """Dependency overrides that make process_url fetch through `transport`, resolving host names with `resolver`."""
    return {get_fetch: lambda: partial(fetch_url, transport=transport, resolver=resolver)}


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def index_documents():
    """The documents of a module's index; modules that use `index_dir` define their own."""
    raise NotImplementedError("define an `index_documents` fixture in the test module")


@pytest.fixture(scope="module")
def built_index(tmp_path_factory, index_documents):
    """The module's index, embedded once (real sentence-transformers and FAISS)."""
    from retrieval.build import build_index
    from retrieval.embedder import Embedder
    from retrieval.index import IndexStore
    from store.config import default_embedding_model

    root = tmp_path_factory.mktemp("index")
    build_index(index_documents, Embedder(default_embedding_model()), IndexStore(root))
    return root


@pytest.fixture
def index_dir(tmp_path, built_index):
    """A fresh copy of the module's index for one test (tests add pages to it)."""
    import shutil

    target = tmp_path / "index"
    shutil.copytree(built_index, target)
    return target

