"""The proxy's app factory: `uvicorn --factory proxy.app:create_app` or `abloop proxy`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from proxy.deps import AppState
from proxy.live import Live
from proxy.metrics import Metrics
from proxy.retriever import Retriever
from proxy.routes import admin, health, prompts, rules, search
from proxy.upstream import Upstream
from store.config import Settings
from store.db import Database
from store.writer import EventWriter

log = logging.getLogger("abloop.proxy")


def create_app(
    settings: Settings | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    ingest_transport: httpx.AsyncBaseTransport | None = None,
    ingest_resolver: Any = None,
) -> FastAPI:
    """Build the proxy. Nothing connects or loads until the app starts (its lifespan).

    `transport` replaces the network for upstream LLM calls and `ingest_*` for URL ingestion;
    both are for tests.
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.database_url)
        db.migrate()
        writer = EventWriter(
            db,
            settings.spool_dir,
            batch_size=settings.writer_batch_size,
            flush_interval_s=settings.writer_flush_interval_s,
        )
        retriever = Retriever(settings.index_dir, settings.embedding_model,
                              max_batch=settings.embed_max_batch, threads=settings.embed_threads)
        live = Live(settings, db, retriever)
        upstream = Upstream(
            timeout_s=settings.llm_timeout_s,
            api_key=settings.llm_api_key.get_secret_value() if settings.llm_api_key else None,
            max_tokens=settings.llm_max_tokens,
            temperature=settings.llm_temperature,
            failure_threshold=settings.circuit_failure_threshold,
            reset_s=settings.circuit_reset_s,
            max_connections=settings.upstream_max_connections,
            transport=transport,
        )
        metrics = Metrics()
        state = AppState(settings, db, writer, retriever, live, upstream, metrics, ingest_transport, ingest_resolver)
        _watch(state)
        await writer.start()
        await retriever.start()
        await live.start()
        app.state.abloop = state
        log.info("proxy ready: experiment %s, index %s", live.snapshot.experiment.id, retriever.version)
        try:
            yield
        finally:
            await live.stop()
            await upstream.aclose()
            await retriever.stop()
            await writer.stop()  # flushes, or spools what it cannot write: nothing is lost
            db.dispose()

    app = FastAPI(title="abloop proxy", version="0.1.0", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(search.router)
    app.include_router(admin.router)
    app.include_router(prompts.router)
    app.include_router(rules.router)
    app.include_router(health.router)
    return app


def _watch(state: AppState) -> None:
    m = state.metrics
    m.watch("abloop_writer_queue_depth", "Rows waiting to be written to the store.", lambda: state.writer.queue_depth)
    m.watch("abloop_writer_spool_bytes", "Bytes spooled to disk while the store was unreachable.",
            lambda: state.writer.spool_bytes)
    m.watch("abloop_writer_spooled_rows", "Rows ever spooled to disk.", lambda: state.writer.spooled)
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
    """422 with FastAPI's usual `detail` plus one sentence that names each bad field."""
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item.get("loc", ()) if part not in ("body",)) or "body"
        problems.append(f"{location}: {item.get('msg')}")
    return JSONResponse(
        status_code=422,
        content={"message": "invalid request: " + "; ".join(problems), "detail": _jsonable(error.errors())},
    )


def _jsonable(errors: Any) -> Any:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(errors, custom_encoder={Exception: str})
