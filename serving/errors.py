"""The engine's errors: each carries the HTTP status and OpenAI error type/code the API layer answers with.

A module of its own so the engine and the adapter registry can both raise them without importing each other.
"""

from __future__ import annotations


class EngineError(Exception):
    """An error with an HTTP status and OpenAI error type/code, raised to the API layer."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class QueueFull(EngineError):
    status = 503
    type = "server_error"
    code = "queue_full"


class ModelNotFound(EngineError):
    status = 404
    code = "model_not_found"


class AdapterExists(EngineError):
    status = 409
    code = "adapter_exists"


class BadAdapter(EngineError):
    status = 400
    code = "invalid_adapter"


class PromptTooLong(EngineError):
    status = 400
    code = "context_length_exceeded"


class EngineStopped(EngineError):
    status = 503
    type = "server_error"
    code = "engine_stopped"


class GenerationFailed(EngineError):
    status = 500
    type = "server_error"
    code = "generation_failed"
