"""store/tracing.py: off by default at no cost, OTLP/HTTP export when configured, W3C context in and out."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest

from store import tracing

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (a process sets its tracer provider once), without OTEL_* from outside."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    clean["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)


@contextmanager
def otlp_sink() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """An HTTP server that accepts OTLP/HTTP posts; yields its base URL and the (path, body) pairs received."""
    received: list[tuple[str, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_off_without_an_endpoint_and_the_sdk_is_never_imported():
    result = _python(
        "import sys\n"
        "from store import tracing\n"
        "assert 'opentelemetry' not in sys.modules, 'importing store.tracing imported OpenTelemetry'\n"
        "assert tracing.configure_tracing('abloop-test') is False\n"
        "assert not tracing.is_enabled()\n"
        "with tracing.span('nothing') as span:\n"
        "    assert not span.is_recording()\n"
        "assert tracing.current_trace_id() is None and tracing.inject({}) == {}\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry.sdk')]\n"
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("variable", "path", "service_env", "service"), [
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "", None, "abloop-test"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "/custom/traces", "ops-chosen-name", "ops-chosen-name"),
])
def test_an_endpoint_turns_export_on(variable, path, service_env, service):
    with otlp_sink() as (url, received):
        env = {variable: url + path, **({"OTEL_SERVICE_NAME": service_env} if service_env else {})}
        result = _python(
            "from opentelemetry import trace\n"
            "from store import tracing\n"
            "assert tracing.configure_tracing('abloop-test') is True\n"
            "provider = trace.get_tracer_provider()\n"
            "assert tracing.configure_tracing('abloop-other') is True\n"
            "assert trace.get_tracer_provider() is provider\n"
            "with tracing.span('exported work') as span:\n"
            "    assert span.is_recording() and tracing.current_trace_id() is not None\n"
            "provider.shutdown()\n",
            **env,
        )
    assert result.returncode == 0, result.stderr
    assert [p for p, _ in received] == [path or "/v1/traces"]
    body = received[0][1]  # protobuf: the strings are in it as they are
    assert b"exported work" in body and service.encode() in body
    assert b"abloop-other" not in body


def test_inject_and_extract_carry_the_w3c_context(span_exporter):
    assert tracing.inject({}) == {}
    with tracing.span("caller") as caller:
        headers = tracing.inject({"accept": "application/json"})
        trace_id = tracing.current_trace_id()
    context = caller.get_span_context()
    assert trace_id == format(context.trace_id, "032x")
    assert headers["traceparent"] == f"00-{trace_id}-{context.span_id:016x}-{context.trace_flags:02x}"
    assert headers["accept"] == "application/json"

    from opentelemetry import context as otel_context

    token = otel_context.attach(tracing.extract(headers))
    try:
        with tracing.span("callee", kind="server"):
            pass
    finally:
        otel_context.detach(token)
    callee = next(s for s in span_exporter.get_finished_spans() if s.name == "callee")
    assert callee.context.trace_id == context.trace_id
    assert callee.parent.span_id == context.span_id and callee.parent.is_remote


def test_a_span_records_the_exception_that_leaves_it(span_exporter):
    with pytest.raises(KeyError), tracing.span("failing", {"abloop.arm": "control"}):
        raise KeyError("missing")
    (span,) = span_exporter.get_finished_spans()
    assert span.status.status_code.name == "ERROR"
    assert span.attributes["abloop.arm"] == "control"
    assert [event.name for event in span.events] == ["exception"]


def test_off_means_no_span_and_nothing_to_pass_on():
    assert not tracing.is_enabled()
    with tracing.span("ignored") as span:
        assert not span.is_recording()
        assert tracing.current_trace_id() is None
        assert tracing.inject({}) == {}


def test_one_tracer_per_provider(span_exporter):
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    # The SDK returns the same tracer each time but takes ~17 µs to find it: the cache must not ask it again.
    with mock.patch.object(provider, "get_tracer", wraps=provider.get_tracer) as get_tracer:
        first = tracing.tracer("abloop-cached")
        assert tracing.tracer("abloop-cached") is first
    assert get_tracer.call_count == 1
    first = tracing.tracer("abloop")
    with tracing.span("kept"):
        pass
    assert [s.name for s in span_exporter.get_finished_spans()] == ["kept"]

    from opentelemetry.sdk.trace import TracerProvider

    with mock.patch.object(trace, "_TRACER_PROVIDER", TracerProvider()):
        assert tracing.tracer("abloop") is not first  # another provider: its own tracer
        with tracing.span("elsewhere"):
            pass
    with tracing.span("back"):  # the first provider again, not the other one's cached tracer
        pass
    assert [s.name for s in span_exporter.get_finished_spans()] == ["kept", "back"]
