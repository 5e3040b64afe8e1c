"""The proxy's app factory: `uvicorn --factory proxy.app:create_app` or `abloop proxy`."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException  # what FastAPI raises on a body it cannot parse; its own subclasses it

from proxy.deps import AppState
from proxy.limits import BodySizeLimit
from proxy.live import Live
from proxy.metrics import Metrics
from proxy.observability import FASTAPI_TELEMETRY, instrument
from proxy.ratelimit import RateLimited, RateLimiter, rate_limited
from proxy.retriever import Retriever
from proxy.routes import admin, health, prompts, rules, search
from proxy.upstream import Upstream
from store import tracing
from store.config import Settings
from store.db import Database
from store.runtime import freeze_startup_heap
from store.writer import EventWriter

log = logging.getLogger("abloop.proxy")


def create_app(settings: Settings | None = None, *, migrate: bool = True, freeze_heap: bool = False) -> FastAPI:
    """Build the proxy. Nothing connects or loads until the app starts (its lifespan).

    `migrate=False`: the store is already migrated (by the parent of several workers, or `abloop migrate`).
    `freeze_heap=True`: once started, the process's objects are frozen out of the garbage collector's sight
    (store.runtime.freeze_startup_heap); for a process that serves this app and nothing else (`abloop proxy`).
    Spans are exported when OTEL_EXPORTER_OTLP_ENDPOINT is set (store.tracing); logging is the caller's to set
    up (`abloop proxy` does: store.logs).
    """
    settings = settings or Settings()
    tracing.configure_tracing("abloop-proxy")  # here, not only in the CLI: a worker process runs no CLI

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.database_url)
        if migrate:
            db.migrate()
        writer = EventWriter(
            db,
            settings.spool_dir,
            batch_size=settings.writer_batch_size,
            flush_interval_s=settings.writer_flush_interval_s,
        )
        retriever = Retriever(settings.index_dir, settings.embedding_model,
                              max_batch=settings.embed_max_batch, threads=settings.embed_threads,
                              backend=settings.embed_backend, cache_size=settings.embed_cache_size)
        live = Live(settings, db, retriever)
        upstream = Upstream(
            timeout_s=settings.llm_timeout_s,
            api_key=settings.llm_key(),
            max_tokens=settings.llm_max_tokens,
            temperature=settings.llm_temperature,
            failure_threshold=settings.circuit_failure_threshold,
            reset_s=settings.circuit_reset_s,
            max_connections=settings.upstream_max_connections,
        )
        metrics = Metrics()
        state = AppState(settings, db, writer, retriever, live, upstream, metrics,
                         rate_limiter=RateLimiter(settings, metrics))
        _watch(state)
        await writer.start()
        await retriever.start()
        await live.start()
        metrics.start()
        app.state.abloop = state
        frozen = await asyncio.to_thread(freeze_startup_heap) if freeze_heap else 0
        log.info("proxy ready: experiment %s, index %s", live.snapshot.experiment.id, retriever.version,
                 extra={"gc_frozen_objects": frozen})
        try:
            yield
        finally:
            await _shut_down(
                metrics.stop,
                live.stop,
                state.rate_limiter.aclose,
                upstream.aclose,
                retriever.stop,
                writer.stop,  # flushes, or spools what it cannot write: nothing is lost
                db.dispose,
                lambda: asyncio.to_thread(tracing.flush),  # the last spans (see store.tracing.flush)
            )

    app = FastAPI(title="abloop proxy", version="0.1.0", lifespan=lifespan, telemetry=FASTAPI_TELEMETRY)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RateLimited, rate_limited)
    app.include_router(search.router)
    app.include_router(admin.router)
    app.include_router(prompts.router)
    app.include_router(rules.router)
    app.include_router(health.router)
    instrument(app)
    return app


async def _shut_down(*steps: Callable[[], Any]) -> None:
    """Run every shutdown step in order, whatever the steps before it raised; then raise the first error.

    One step failing (metrics' mark_process_dead on a read-only disk) must not skip the writer's stop,
    which writes or spools the queued events and feedback: skipped, they die with the process.
    """
    failures: list[BaseException] = []
    for step in steps:
        try:
            result = step()
            if inspect.isawaitable(result):
                await result
        except BaseException as exc:  # a cancellation too: the steps after it still run, then it is raised
            log.error("shutdown step %s failed", getattr(step, "__qualname__", step), exc_info=exc)
            failures.append(exc)
    if failures:
        raise failures[0]


def create_served_app() -> FastAPI:
    """The app factory of `abloop proxy` (one process)."""
    return create_app(freeze_heap=True)


def create_worker_app() -> FastAPI:
    """The app factory of `abloop proxy --workers N`'s workers: their parent migrated the store before starting them."""
    return create_app(migrate=False, freeze_heap=True)


def _watch(state: AppState) -> None:
    # With several workers: each has its own queue; they share SPOOL_DIR (spool_bytes is the directory's);
    # the rest is the same for all, or the worst of them (see proxy/metrics.py).
    m = state.metrics
    m.watch("abloop_writer_queue_depth", "Rows waiting to be written to the store.", lambda: state.writer.queue_depth,
            across_workers="livesum")
    m.watch("abloop_writer_spool_bytes", "Bytes spooled to disk while the store was unreachable.",
            lambda: state.writer.spool_bytes)
    m.watch("abloop_writer_spooled_rows", "Rows ever spooled to disk.", lambda: state.writer.spooled,
            across_workers="sum")
    m.watch("abloop_candidate_share", "Share of users bucketed to the candidate arm.",
            lambda: state.live.snapshot.experiment.candidate_share if state.live.snapshot else 0.0)
    m.watch("abloop_open_circuits", "Upstream servers whose circuit breaker is open.",
            lambda: sum(b.is_open for b in state.upstream.breakers.values()))
    m.watch("abloop_index_chunks", "Chunks in the index version this replica serves.", lambda: state.retriever.size)
    m.watch("abloop_index_load_seconds", "Seconds the last index (re)load took to read from disk.",
            lambda: state.retriever.load_seconds)
    m.watch_label("abloop_index_info", "The index version this replica serves (value 1).", "version",
                  lambda: state.retriever.version)


async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
    """422 with FastAPI's usual `detail` plus one sentence that names each bad field.

    The input is hostile until validated: `detail` echoes at most a short excerpt of it, and only
    text that encodes (a lone surrogate or an infinity would otherwise turn the 422 into a 500).
    """
    issues = [_issue(item) for item in error.errors()]
    problems = [f"{_location(issue['loc'])}: {issue['msg']}" for issue in issues]
    return JSONResponse(
        status_code=422,
        content={"message": "invalid request: " + "; ".join(problems), "detail": issues},
    )


# FastAPI's answer to a body that its JSON parser raised on with something other than a decode error: bytes
# that are not UTF-8, an integer over Python's 4,300 digits, nesting past the recursion limit.
_BODY_PARSE_FAILED = "There was an error parsing the body"


async def _http_error(request: Request, error: HTTPException) -> Any:
    """A body FastAPI could not parse is a 422 naming the body, as every other bad body is (DESIGN)."""
    if error.status_code == 400 and error.detail == _BODY_PARSE_FAILED and error.__cause__ is not None:
        return await _validation_error(request, RequestValidationError([{
            "loc": ("body",), "msg": f"JSON body could not be parsed: {_parse_failure(error.__cause__)}",
            "type": "json_invalid"}]))
    return await http_exception_handler(request, error)


def _parse_failure(cause: BaseException) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return "not UTF-8"
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "an integer over 4,300 digits"
    return type(cause).__name__


# The most of any client-sent value a 422 echoes back.
_EXCERPT_CHARS = 80


def _issue(item: dict[str, Any]) -> dict[str, Any]:
    issue: dict[str, Any] = {
        # A body's unknown key is part of `loc`, so it is client text like any other.
        "loc": [part if isinstance(part, int) else _excerpt(str(part)) for part in item.get("loc", ())],
        "msg": _encodable(str(item.get("msg", ""))),
        "type": str(item.get("type", "")),
    }
    if "input" in item:
        issue["input"] = _excerpt(item["input"])
    if item.get("ctx"):
        issue["ctx"] = {str(key): _excerpt(value) for key, value in item["ctx"].items()}
    return issue


def _location(loc: list[str | int]) -> str:
    if len(loc) == 2 and loc[0] == "header":
        return "-".join(word.capitalize() for word in str(loc[1]).split("-")) + " header"
    return ".".join(str(part) for part in loc if part != "body") or "body"


def _excerpt(value: Any) -> Any:
    """`value` as JSON-safe and short: numbers as they are, anything else as text cut to _EXCERPT_CHARS."""
    if value is None or isinstance(value, bool):
        return value
    if (isinstance(value, int) and abs(value) < 10**15) or (isinstance(value, float) and math.isfinite(value)):
        return value
    if isinstance(value, dict | list | tuple):
        try:
            text = json.dumps(value, default=str)
        except (ValueError, RecursionError):  # nested past the recursion limit, or an int too long to print
            text = type(value).__name__
    else:
        text = str(value)  # an error in `ctx`: its message; NaN and infinities: "nan", "inf"
    if len(text) > _EXCERPT_CHARS:
        text = f"{text[:_EXCERPT_CHARS]}… [cut, {len(text)} characters]"
    return _encodable(text)


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
