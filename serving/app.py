"""The OpenAI-compatible HTTP API (FastAPI) over a :class:`serving.engine.Engine`.

Endpoints (serving.routes): ``POST /v1/chat/completions`` (plain and ``stream: true`` server-sent events),
``GET /v1/models``, ``GET /v1/models/{id}``, vLLM's ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter``, ``GET /healthz`` (and vLLM's ``/health``), ``GET /stats``.
Every error body has OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` (serving.responses).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import routes
from serving.engine import Engine
from serving.errors import EngineError
from serving.model import DEFAULT_QUANTIZE
from serving.responses import engine_error_response, error_response, validation_response
from store.tracing import flush as flush_spans

log = logging.getLogger(__name__)


def create_app(
    engine: Engine | None = None,
    *,
    model: str = "default",
    adapters: dict[str, str] | None = None,
    max_batch: int = 16,
    max_queue: int = 256,
    device: str | None = None,
    dtype: str = "auto",
    quantize: str = DEFAULT_QUANTIZE,
    compile: bool = False,
) -> FastAPI:
    """The model server app.

    With ``engine=None`` the app loads ``model`` (``"default"`` or a local HF dir) at startup (``dtype``,
    ``quantize``: :func:`serving.model.load_base_model`; ``compile``: :class:`serving.engine.Engine`) and
    owns the engine (stopped at shutdown).  A given ``engine`` is started if needed and left running at shutdown,
    so tests can share one loaded model across apps.  ``adapters`` (name -> path) are loaded at startup.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = engine is None
        eng = engine
        if eng is None:
            from serving.model import load_base_model

            loaded = await asyncio.to_thread(load_base_model, model, device, dtype, quantize)
            eng = Engine(loaded, max_batch=max_batch, max_queue=max_queue, compile=compile)
        eng.start()
        app.state.engine = eng
        try:
            for name, path in (adapters or {}).items():
                await eng.load_adapter(name, path)
            yield
        finally:
            if owned:
                await asyncio.to_thread(eng.stop)
            await asyncio.to_thread(flush_spans)

    app = FastAPI(title="abloop model server", lifespan=lifespan)
    if engine is not None:
        app.state.engine = engine

    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(EngineError, _on_engine_error)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_crash)
    app.include_router(routes.health)
    app.include_router(routes.models)
    app.include_router(routes.adapters)
    app.include_router(routes.chat)
    return app


async def _on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_response(exc)


async def _on_engine_error(_request: Request, exc: EngineError) -> JSONResponse:
    return engine_error_response(exc)


async def _on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, str(exc.detail), type_, None, code, getattr(exc, "headers", None))


async def _on_crash(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return error_response(500, f"internal error: {type(exc).__name__}", "server_error")
