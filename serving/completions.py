"""One chat completion: from the request's body to the engine and back, plain or streamed as server-sent events,
with its span in the caller's trace and its one log line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, get_current_span, use_span

from serving.engine import Engine
from serving.errors import EngineError
from serving.requests import RequestHandle
from serving.responses import error_body, error_response
from serving.sampling import SamplingParams
from serving.schemas import AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, Usage, completion_id, now
from store.tracing import extract, is_enabled, tracer

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for a client that went away before the answer


async def complete(eng: Engine, body: ChatCompletionRequest, request: Request, call: CompletionCall):
    """The answer to one request: a ChatCompletion, a stream of chunks, or 499 once the client has gone."""
    call.adapter = adapter = eng.resolve(body.model)
    try:
        # Off the event loop: tokenizing a 10 MB prompt took 5 s, and held every other request (/health too).
        prompt_ids = await asyncio.to_thread(eng.encode_chat, body.chat())
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
        return error_response(CLIENT_CLOSED, call.error, "invalid_request_error")
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


class CompletionCall:
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


async def _sse(handle: RequestHandle, model: str, include_usage: bool, call: CompletionCall) -> AsyncIterator[str]:
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
