"""Process-wide test setup: offline models, no telemetry, a private Prefect home; shared helpers."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from store.config import apply_runtime_env

apply_runtime_env()  # before any test module imports torch
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="abloop-prefect-"))

POSTGRES_URL = os.environ.get("ABLOOP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_app(app) -> Iterator[str]:
    """Run an ASGI app under a real uvicorn server on loopback; yields its base URL."""
    from serving.server import ServerThread

    with ServerThread(app) as server:
        yield server.url
