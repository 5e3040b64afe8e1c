"""The OpenAI-compatible HTTP API (FastAPI) over a :class:`serving.engine.Engine`.

Endpoints: ``POST /v1/chat/completions`` (plain and ``stream: true`` server-sent events),
``GET /v1/models``, ``GET /v1/models/{id}``, vLLM's ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter``, ``GET /healthz`` (and vLLM's ``/health``), ``GET /stats``.
Every error body has OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, get_current_span, use_span
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.engine import Engine
from serving.errors import EngineError, ModelNotFound
from serving.model import DEFAULT_QUANTIZE
from serving.requests import RequestHandle
from serving.sampling import SamplingParams
from serving.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    LoadLoraRequest,
    ModelCard,
    ModelList,
    UnloadLoraRequest,
    Usage,
    completion_id,
    now,
)
from store.tracing import extract, is_enabled, tracer
from store.tracing import flush as flush_spans

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
CLIENT_CLOSED = 499  # nginx's status for a client that went away before the answer


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _engine_error_response(exc: EngineError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
    return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, headers)


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts)


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if not errors:
        return _error_response(400, "invalid request body", "invalid_request_error")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return _error_response(
            400, f"Invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", "invalid_request_error"
        )
    messages = []
    for err in errors:
        name = _field(err.get("loc", ()))
        if not name and err.get("type") == "missing":
            messages.append("the request body is required (a JSON object)")
        else:
            messages.append(f"{name or 'body'}: {err.get('msg')}")
    return _error_response(
        400,
        "; ".join(dict.fromkeys(messages)),
        "invalid_request_error",
        _field(first.get("loc", ())) or None,
        "invalid_value" if first.get("type") != "missing" else "missing_field",
    )


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

    # ----------------------------------------------------------------------- errors
    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(EngineError)
    async def _on_engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return _engine_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(exc.status_code, str(exc.detail), type_, None, code, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    def _engine(request: Request) -> Engine:
        return request.app.state.engine

    # ----------------------------------------------------------------------- health and models
    @app.get("/healthz")
    @app.get("/health")
    async def healthz(request: Request) -> JSONResponse:
        eng = _engine(request)
        if not eng.running:
            return _error_response(503, "the generation worker is not running", "server_error")
        return JSONResponse({"status": "ok", "model": eng.name, "queue": eng.queue_depth})

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        eng = _engine(request)
        return {
            **eng.stats.as_dict(),
            "queue": eng.queue_depth,
            "active": eng.active_rows,
            "max_batch": eng.max_batch,
            "max_queue": eng.max_queue,
            "quantize": eng.loaded.quantize,
        }

    def _cards(eng: Engine) -> list[ModelCard]:
        cards = [ModelCard(id=eng.name, created=eng.created, root=str(eng.loaded.path))]
        for name, info in eng.adapters().items():
            cards.append(ModelCard(id=name, created=info["created"], root=info["path"], parent=eng.name))
        return cards

    @app.get("/v1/models")
    async def list_models(request: Request) -> ModelList:
        return ModelList(data=_cards(_engine(request)))

    @app.get("/v1/models/{model_id:path}")
    async def get_model_card(model_id: str, request: Request) -> ModelCard:
        eng = _engine(request)
        for card in _cards(eng):
            if card.id == model_id:
                return card
        raise ModelNotFound(f"The model `{model_id}` does not exist.", param="model")

    # ----------------------------------------------------------------------- adapters (vLLM's API)
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest, request: Request) -> PlainTextResponse:
        await _engine(request).load_adapter(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> PlainTextResponse:
        await _engine(request).unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # ----------------------------------------------------------------------- chat completions
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        call = _CompletionCall(request, body.model, body.stream)
        try:
            with call.active():
                response = await _complete(_engine(request), body, request, call)
        except BaseException as exc:  # answered by the exception handlers above; logged and traced here
            call.finish(exc)
            raise
        if not body.stream:  # a stream's generator finishes the call when the last chunk is sent
            call.finish()
        return response

    return app


async def _complete(eng: Engine, body: ChatCompletionRequest, request: Request, call: _CompletionCall):
    call.adapter = adapter = eng.resolve(body.model)
    try:
        prompt_ids = eng.encode_chat(body.chat())
    except Exception as exc:  # noqa: BLE001 - a template that rejects the conversation
        raise EngineError(f"messages: cannot apply the chat template: {exc}", param="messages") from exc
    params = SamplingParams(
        max_tokens=body.token_limit() or eng.default_max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_list(),
        seed=body.seed,
    )
    call.handle = handle = eng.submit(prompt_ids, params, adapter)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse(handle, body.model, include_usage, call),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    completion = await _await_or_cancel(handle, request)
    if completion is None:  # the client went away; nobody reads this
        call.status, call.error = CLIENT_CLOSED, "client closed the request"
        return _error_response(CLIENT_CLOSED, call.error, "invalid_request_error")
    return ChatCompletion(
        id=call.request_id,
        model=body.model,
        choices=[Choice(message=AssistantMessage(content=completion.text), finish_reason=completion.finish_reason)],
        usage=Usage(
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            total_tokens=completion.total_tokens,
        ),
    )


class _CompletionCall:
    """One chat completion's span in the caller's trace (W3C ``traceparent``: the model server joins the proxy's
    trace), and its one log line, written when it ends.

    FastAPI (0.150) makes a span per request itself, a child of the caller's, when a tracer provider is installed
    before the app is built; the completion's span is then a child of FastAPI's, else of the caller's directly.
    With tracing off no span is made: the caller's context (read from the one header) stands in for it, so the
    log line still carries the caller's trace id.
    """

    def __init__(self, request: Request, model: str, stream: bool):
        self.request_id = completion_id()  # the response's id: the log line and the span carry it too
        self.model = model
        self.stream = stream
        self.adapter: str | None = None
        self.handle: RequestHandle | None = None
        self.status, self.error = 200, None  # what was answered, when no exception says otherwise
        caller = extract(request.headers)
        if not is_enabled():
            self._span: Span | None = get_current_span(caller)
            return
        in_request_span = get_current_span().is_recording()
        self._span = tracer(__name__).start_span(
            "chat completion",
            context=None if in_request_span else caller,
            kind=SpanKind.INTERNAL if in_request_span else SpanKind.SERVER,
            attributes={"gen_ai.request.model": model, "gen_ai.response.id": self.request_id},
        )

    def active(self) -> contextlib.AbstractContextManager:
        """Make the span current (log lines inside carry its trace id); ending it is :meth:`finish`'s job."""
        return use_span(self._span, end_on_exit=False, record_exception=False, set_status_on_exception=False)

    def finish(self, error: BaseException | None = None) -> None:
        """End the span and write the log line; the first call wins (a stream may end twice)."""
        span, self._span = self._span, None
        if span is None:
            return
        status, reason = _outcome(error) if error is not None else (self.status, self.error)
        fields = {key: value for key, value in self._fields(status, reason).items() if value is not None}
        span.set_attributes({f"serving.{key}": value for key, value in fields.items()
                             if key not in ("request_id", "model")})  # already gen_ai.* attributes
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, reason))
        with use_span(span, end_on_exit=True):
            if reason is None:
                log.info("chat completion", extra=fields)
            else:
                log.log(logging.ERROR if status >= 500 else logging.WARNING, "chat completion failed: %s", reason,
                        extra=fields)

    def _fields(self, status: int, reason: str | None) -> dict[str, Any]:
        handle = self.handle
        completion = handle.completion if handle is not None else None
        return {
            "request_id": self.request_id,
            "model": self.model,
            "adapter": self.adapter,
            "stream": self.stream,
            "status": status,
            "error": reason,
            "finish_reason": completion.finish_reason if completion else None,
            "prompt_tokens": len(handle.prompt_ids) if handle is not None else None,
            "completion_tokens": completion.completion_tokens if completion else None,
            "queue_wait_ms": _ms(handle.queue_wait_s) if handle is not None else None,
            "generation_ms": _ms(handle.generation_s) if handle is not None else None,
        }


def _outcome(error: BaseException) -> tuple[int, str]:
    """The HTTP status a failed completion is (or, mid-stream, would have been) answered with, and why."""
    if isinstance(error, EngineError):
        return error.status, error.message
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return CLIENT_CLOSED, "client closed the request"
    return 500, f"internal error: {type(error).__name__}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def _await_or_cancel(handle: RequestHandle, request: Request):
    """Wait for the result; stop generating if the client goes away."""
    task = asyncio.ensure_future(handle.result())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if done:
                return task.result()
            if await request.is_disconnected():
                handle.cancel()
                return None
    finally:
        if not task.done():
            task.cancel()
            handle.cancel()


def _sse_data(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _sse(handle: RequestHandle, model: str, include_usage: bool, call: _CompletionCall) -> AsyncIterator[str]:
    cid, created = call.request_id, now()

    def chunk(delta: dict, finish: str | None = None) -> dict:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if include_usage:
            obj["usage"] = None
        return obj

    try:
        try:
            yield _sse_data(chunk({"role": "assistant", "content": ""}))
            async for piece in handle.deltas():
                yield _sse_data(chunk({"content": piece}))
            c = handle.completion
            assert c is not None
            yield _sse_data(chunk({}, c.finish_reason))
            if include_usage:
                usage = {
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.completion_tokens,
                    "total_tokens": c.total_tokens,
                }
                yield _sse_data(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
        except EngineError as exc:
            call.finish(exc)
            yield _sse_data(error_body(exc.message, exc.type, exc.param, exc.code))
        yield "data: [DONE]\n\n"
    except BaseException as exc:  # the client went away (GeneratorExit, cancellation) or a bug
        call.finish(exc)
        raise
    finally:
        handle.cancel()  # a no-op when finished; stops generation when the client went away
        call.finish()
