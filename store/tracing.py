"""OpenTelemetry traces for every abloop process, costing nothing when they are off.

`configure_tracing` installs the SDK (a batching OTLP/HTTP exporter) only when OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set; otherwise the API's no-op tracer stays and the SDK is never imported.
`span` then opens no span at all, so a hot path can be annotated freely. The W3C trace context still travels
either way: `extract` joins a caller's trace and `inject` passes the current one on (to an upstream arm), so
an OTel-aware upstream lands in the caller's trace even when this process exports nothing.

Nothing here imports OpenTelemetry at module import: `import store.tracing` stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
TRACER_NAME = "abloop"

_configured_service: str | None = None


def configure_tracing(service_name: str) -> bool:
    """Export spans over OTLP/HTTP when an endpoint is configured; True if tracing is on.

    The service name is `service_name` unless OTEL_SERVICE_NAME says otherwise. The exporter reads the rest of
    the standard OTEL_EXPORTER_OTLP_* variables (headers, timeout) and the sampler OTEL_TRACES_SAMPLER.
    Idempotent: the first call in a process sets the global provider, later ones only report it.
    """
    global _configured_service
    if _configured_service is not None:
        return True
    if not any(os.environ.get(name) for name in ENDPOINT_VARIABLES):
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)  # flushed and shut down at exit by the provider itself
    _configured_service = name
    return True


def flush() -> None:
    """Export the spans still batched. Call it when a server shuts down: uvicorn ends the process with the
    signal that stopped it, so the SDK's own flush at exit never runs (the last seconds of spans were lost)."""
    trace = _trace_api()
    flush_provider = getattr(trace.get_tracer_provider(), "force_flush", None) if trace else None
    if flush_provider is not None:  # the API's no-op provider has none
        flush_provider()


def is_enabled() -> bool:
    """Whether spans are recorded: an SDK (or any real) tracer provider is installed."""
    trace = _trace_api()
    if trace is None:
        return False
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def tracer(name: str) -> Tracer:
    """The current provider's tracer for `name`, made once per provider.

    The SDK's `get_tracer` builds the instrumentation scope and looks its tracer up on every call (1.45.2
    returns the same tracer each time, but takes ~17 µs to find it): paid by every span of every request
    before this cache (docs/BENCHMARKS.md, "Observability overhead").
    """
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    cached = _tracers.get(name)
    if cached is None or cached[0] is not provider:
        cached = _tracers[name] = (provider, provider.get_tracer(name))
    return cached[1]


_tracers: dict[str, tuple[Any, Tracer]] = {}


SpanKindName = Literal["internal", "server", "client", "producer", "consumer"]


def span(name: str, attributes: Mapping[str, Any] | None = None, *,
         kind: SpanKindName = "internal") -> AbstractContextManager[Span]:
    """A child span of the current one, made current for the block; a no-op span while tracing is off.

    An exception leaving the block is recorded on the span and marks it as an error.
    """
    if not is_enabled():
        return _no_span()
    from opentelemetry.trace import SpanKind

    return tracer(TRACER_NAME).start_as_current_span(name, kind=SpanKind[kind.upper()], attributes=attributes)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context (W3C `traceparent`, `tracestate`) to `headers`; returns them.

    Adds nothing when there is no valid current span (no trace to join).
    """
    if _trace_api() is not None:
        _w3c().inject(headers)
    return headers


def extract(headers: Mapping[str, str]) -> Context:
    """The trace context a caller sent (W3C `traceparent`, `tracestate`; lower-case names), as an OTel Context."""
    return _w3c().extract(headers)


def current_trace_id() -> str | None:
    """The current span's trace id as 32 hex digits; None when there is no valid span."""
    ids = current_ids()
    return ids[0] if ids else None


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span in hex; None when there is no valid span."""
    trace = _trace_api()
    if trace is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def _trace_api():
    """opentelemetry.trace if something has imported it; until then there can be no span to read."""
    return sys.modules.get("opentelemetry.trace")


@functools.cache
def _w3c():
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


@functools.cache
def _no_span() -> AbstractContextManager[Span]:
    """What `span` gives while tracing is off: the API's invalid span, which records nothing (reusable)."""
    from opentelemetry.trace import INVALID_SPAN

    return contextlib.nullcontext(INVALID_SPAN)
