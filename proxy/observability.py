"""The proxy's request-level logs and traces: the request span, the caller's trace, the error line.

`RequestContext`, one pure ASGI middleware, does all of it. With tracing on it opens each request's
SERVER span (the root, or the child of an incoming `traceparent`), named and attributed after
OpenTelemetry's HTTP conventions once the route is known. It is the proxy's own because the generic
ones cost more: in process, tracing added 75 µs of CPU per request this way, 108 µs through FastAPI's
built-in telemetry and 174 µs through opentelemetry-instrumentation-fastapi (bench/request_span.py,
docs/BENCHMARKS.md); FastAPI's is switched off in `create_app` so that no request gets two spans.
With tracing off it still joins an incoming `traceparent`, cheaply: the upstream arm then gets the
caller's trace context and the log lines its trace_id.

It also logs one line for every response with status >= 400 (INFO for 4xx, WARNING for 5xx), with
the fields the handler named with `request_fields` (a request_id, once there is one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from store import tracing
from store.logs import bind

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span

log = logging.getLogger("abloop.proxy")

# Probes and scrapes: no span for them.
UNTRACED_PATHS = ("/healthz", "/readyz", "/metrics")
# FastAPI's own request telemetry, off: RequestContext makes the proxy's request spans, the Prometheus
# metrics and the error lines are its own, and no OpenTelemetry log or meter provider is set up.
FASTAPI_TELEMETRY = {"tracing": False, "metrics": False, "logs": False}

_error_line_fields: ContextVar[dict[str, Any] | None] = ContextVar("abloop_error_line_fields", default=None)


@contextmanager
def request_fields(**fields: Any) -> Iterator[None]:
    """`bind(**fields)` for the lines logged while handling, and the same fields on the request's error line.

    The error line is logged after the handler has returned, when its bound fields are gone.
    """
    collected = _error_line_fields.get()
    if collected is not None:
        collected.update(fields)
    with bind(**fields):
        yield


def instrument(app: FastAPI) -> None:
    """Request spans and trace context for `app` (see the module doc). Call it after the app's own middleware."""
    app.add_middleware(RequestContext, traced=tracing.is_enabled())


class RequestContext:
    """Pure ASGI middleware (no extra task per request): the request span or the caller's trace, error lines."""

    def __init__(self, app: ASGIApp, *, traced: bool) -> None:
        self.app = app
        self.traced = traced

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        fields: dict[str, Any] = {}
        fields_token = _error_line_fields.set(fields)
        span = self._start_span(scope) if self.traced and scope["path"] not in UNTRACED_PATHS else None
        context_token = self._attach(scope, span)
        try:
            await self.app(scope, receive, send_noting_status)
        except Exception as exc:
            status = status or 500  # the server answers 500 and logs the traceback
            if span is not None:
                span.record_exception(exc)
            raise
        finally:
            if status >= 400:
                log.log(logging.INFO if status < 500 else logging.WARNING, "request failed",
                        extra={"method": scope["method"], "path": scope["path"], "http_status": status, **fields})
            _error_line_fields.reset(fields_token)
            if span is not None:
                _end_span(span, scope, status)
            if context_token is not None:
                from opentelemetry import context

                context.detach(context_token)

    @staticmethod
    def _start_span(scope: Scope) -> Span:
        from opentelemetry.trace import SpanKind

        attributes = {
            "http.request.method": scope["method"],
            "url.path": scope["path"],
            "url.scheme": scope["scheme"],
            "network.protocol.version": scope["http_version"],
        }
        return tracing.tracer(tracing.TRACER_NAME).start_span(
            scope["method"], context=_caller_context(scope), kind=SpanKind.SERVER, attributes=attributes
        )

    @staticmethod
    def _attach(scope: Scope, span: Span | None) -> object | None:
        """Make the request span, or else the caller's trace, current for the handler."""
        if span is not None:
            from opentelemetry import context, trace

            return context.attach(trace.set_span_in_context(span))
        caller = _caller_context(scope)
        if caller is None:
            return None
        from opentelemetry import context

        return context.attach(caller)


def _caller_context(scope: Scope) -> Context | None:
    """The trace context of an incoming `traceparent`, None without one (a new trace starts)."""
    carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
               if name in (b"traceparent", b"tracestate")}
    return tracing.extract(carrier) if "traceparent" in carrier else None


def _end_span(span: Span, scope: Scope, status: int) -> None:
    """Name the span after its route (known once routing ran), record the outcome, end it."""
    from opentelemetry.trace import StatusCode

    route = getattr(scope.get("route"), "path", None)
    if route is not None:
        span.update_name(f"{scope['method']} {route}")
        span.set_attribute("http.route", route)
    if status:
        span.set_attribute("http.response.status_code", status)
    if status == 0 or status >= 500:  # no answer at all counts as a server error too
        span.set_status(StatusCode.ERROR)
    span.end()
