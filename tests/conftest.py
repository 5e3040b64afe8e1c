"""Process-wide test setup: offline models, no telemetry, a private Prefect home; shared helpers."""

from __future__ import annotations

import os
import random
import socket
import sys
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import pytest

from store.config import apply_runtime_env

apply_runtime_env()  # before any test module imports torch
# pytest-xdist runs several processes on the cores: torch's default of one intra-op thread per core in each
# would ask for workers x cores threads. One share each (the servers and subprocesses the tests start
# inherit it): `make test` 606 -> 553 s on 2 cores (docs/BENCHMARKS.md, "Test suite"). An explicit
# OMP_NUM_THREADS wins; a run without xdist keeps torch's default.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _cores = len(os.sched_getaffinity(0))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
# Each process its own Prefect home (its own temporary server and database): a pytest-xdist worker inherits
# the controller's environment, so an inherited PREFECT_HOME would be shared between workers.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="abloop-prefect-")
# Prefect's temporary server gets 20 s to answer by default; beside the other worker's model loads on a
# slow, noisy 2-core host it took longer (the demo-approval test failed so once, 2026-12-01, when it still
# started one of its own), as the demo itself allows for (abloop.demo.demo_env). The harness below has 120 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

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


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One temporary Prefect server per test process, started by the first test that runs a flow.

    Stopped at the end of the session, while pytest still captures: a flow run outside it would start
    Prefect's ephemeral server instead, stopped only at exit, when its last log line meets a closed stream
    ("--- Logging error ---" at the end of the run).
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# The intra-op thread count every test starts with once torch is loaded: torch's own default where the caller
# fixed it (OMP_NUM_THREADS), else one per usable CPU.
TORCH_THREADS = int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))


@pytest.fixture(autouse=True)
def _same_torch_threads() -> Iterator[None]:
    """Every test starts, and leaves, with `TORCH_THREADS` intra-op threads (when torch is loaded).

    The count is process-wide and the proxy's retriever sets it (EMBED_THREADS): left as a proxy test set it,
    the tests after it would run with another count, whose different summation order can change a bf16
    result, so that a test's outcome would depend on which tests ran before it in the same process.
    """
    _set_torch_threads()
    yield
    _set_torch_threads()


def _set_torch_threads() -> None:
    torch = sys.modules.get("torch")  # no test pays for importing torch
    if torch is not None and torch.get_num_threads() != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(autouse=True)
def _logging_as_found() -> Iterator[None]:
    """Every test leaves logging as it found it.

    A test that calls `abloop.cli.main` runs `store.logs.configure_logging`, which gives the root logger a
    handler on that moment's stderr: left in place, every later test in the process would log through it,
    at its level, and its lines (written in batches, up to 0.1 s late) would reach the terminal between
    two tests' captures.
    """
    import logging

    from store.logs import QUIET_LOGGERS

    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", *QUIET_LOGGERS)]
    found = [(logger, logger.handlers[:], logger.level, logger.propagate, logger.disabled) for logger in loggers]
    yield
    for logger, handlers, level, propagate, disabled in found:
        for added in [h for h in logger.handlers if h not in handlers]:
            added.close()  # writes what it still holds (store.logs.LineWriter batches), here, inside the capture
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate, logger.disabled = propagate, disabled


@pytest.fixture(autouse=True)
def _salts_fixed_per_test(request, monkeypatch) -> None:
    """Each experiment a test starts gets a salt drawn from a generator seeded by the test's id.

    The salt decides which simulated user lands in which arm, so with a fresh random salt every run a
    split or verdict check fails now and then however right the code is (CI saw a sample ratio check
    fail at p = 0.0007 that way). Fixed, like the tests' other seeds: a check passes or fails every run.
    Tests of the salt itself opt out with `@pytest.mark.random_salt`.
    """
    if request.node.get_closest_marker("random_salt"):
        return
    from experiment import lifecycle
    from store import experiments

    draws = random.Random(zlib.crc32(request.node.nodeid.encode()))

    def seeded_salt() -> str:
        return f"{draws.getrandbits(64):016x}"

    for module in (experiments, lifecycle):  # lifecycle imported the name
        monkeypatch.setattr(module, "new_salt", seeded_salt)


@pytest.fixture
def span_exporter():
    """Spans recorded in memory for one test: an SDK tracer provider stands in for the global one meanwhile.

    OpenTelemetry lets a process set its global provider once, so this patches it and puts it back after.
    Take the fixture before building the app under test: instrumentation picks its tracer when it is set up.
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with mock.patch.object(trace, "_TRACER_PROVIDER", provider):
        yield exporter
    provider.shutdown()


UNDER_TEST_EMBEDDER = "/models/embedder-under-test"


@pytest.fixture
def embedder_asked(monkeypatch) -> list[str]:
    """EMBEDDING_MODEL names a model only this test knows; whoever builds `retrieval.embedder.Embedder` gets the
    real one under that name, and the list says which models were asked for: the setting's way in, shown."""
    from retrieval.embedder import Embedder
    from store.config import default_embedding_model

    asked: list[str] = []
    monkeypatch.setenv("EMBEDDING_MODEL", UNDER_TEST_EMBEDDER)
    monkeypatch.setattr("retrieval.embedder.Embedder",
                        lambda model: asked.append(model) or Embedder(default_embedding_model()))
    return asked
