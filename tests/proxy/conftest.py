from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from proxy.app import create_app
from serving.stub import running_stub
from store.config import Settings
from tests.conftest import free_port, serve_app

ADMIN_TOKEN = "test-admin-token"


@pytest.fixture(scope="module")
def control_upstream():
    with running_stub(model="control-model", answer="control says hi") as (stub, url):
        yield stub, url


@pytest.fixture(scope="module")
def candidate_upstream():
    with running_stub(model="candidate-model", answer="candidate says hi") as (stub, url):
        yield stub, url


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
def running_proxy(settings: Settings, **app_kwargs) -> Iterator[tuple[str, object]]:
    app = create_app(settings, **app_kwargs)
    with serve_app(app) as url:
        yield url, app


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c
