"""The proxy's request-level logs and traces: the request span, the caller's trace, the error line.

With tracing on, OpenTelemetry's FastAPI instrumentation makes each request's span (the root, or the child of
an incoming `traceparent`). With it off, `RequestContext` still joins an incoming `traceparent`, cheaply: the
upstream arm then gets the caller's trace context and the log lines its trace_id.

`RequestContext` also logs one line for every response with status >= 400 (INFO for 4xx, WARNING for 5xx),
with the fields the handler named with `request_fields` (a request_id, once there is one).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from store import tracing
from store.logs import bind

log = logging.getLogger("abloop.proxy")

# Probes and scrapes: no span for them.
UNTRACED_PATHS = ("/healthz", "/readyz", "/metrics")

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
    """Request spans and trace context for `app`: the FastAPI instrumentation while spans are recorded, else
    only the W3C context of the caller (see the module doc). Call it after the app's own middleware."""
    traced = tracing.is_enabled()
    app.add_middleware(RequestContext, join_trace=not traced)
    if traced:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        # The ASGI "receive"/"send" spans would triple the spans per request and say nothing new.
        FastAPIInstrumentor.instrument_app(app, excluded_urls=",".join(UNTRACED_PATHS),
                                           exclude_spans=["receive", "send"])


class RequestContext:
    """Pure ASGI middleware (no extra task per request): joins the caller's trace, logs error responses."""

    def __init__(self, app: ASGIApp, *, join_trace: bool) -> None:
        self.app = app
        self.join_trace = join_trace

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
        trace_token = self._join_trace(scope) if self.join_trace else None
        try:
            await self.app(scope, receive, send_noting_status)
        except Exception:
            status = status or 500  # the server answers 500 and logs the traceback
            raise
        finally:
            if status >= 400:
                log.log(logging.INFO if status < 500 else logging.WARNING, "request failed",
                        extra={"method": scope["method"], "path": scope["path"], "http_status": status, **fields})
            _error_line_fields.reset(fields_token)
            if trace_token is not None:
                from opentelemetry import context

                context.detach(trace_token)

    @staticmethod
    def _join_trace(scope: Scope) -> object | None:
        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
                   if name in (b"traceparent", b"tracestate")}
        if "traceparent" not in carrier:
            return None
        from opentelemetry import context

        return context.attach(tracing.extract(carrier))
