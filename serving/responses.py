"""The model server's error answers, all in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serving.errors import EngineError

RETRY_AFTER_S = 1  # on a 503 (queue full, engine stopped): a client that waits it finds room or a restarted server


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    """The body; also a stream's error event (serving.completions), after the 200 was sent."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def engine_error_response(exc: EngineError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, headers)


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts)


def validation_response(exc: RequestValidationError) -> JSONResponse:
    """400, as OpenAI answers a bad body (FastAPI's 422 is not what OpenAI clients expect): every field at fault
    named in the message, the first as `param`."""
    errors = exc.errors()
    if not errors:
        return error_response(400, "invalid request body", "invalid_request_error")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return error_response(
            400, f"Invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", "invalid_request_error"
        )
    messages = []
    for err in errors:
        name = _field(err.get("loc", ()))
        if not name and err.get("type") == "missing":
            messages.append("the request body is required (a JSON object)")
        else:
            messages.append(f"{name or 'body'}: {err.get('msg')}")
    return error_response(
        400,
        "; ".join(dict.fromkeys(messages)),
        "invalid_request_error",
        _field(first.get("loc", ())) or None,
        "invalid_value" if first.get("type") != "missing" else "missing_field",
    )
