"""One logging setup for every abloop process: JSON lines for a log pipeline, or text for a terminal.

`configure_logging` (or `logging_config`, the same setup as a `logging.config.dictConfig` dict, which uvicorn
takes as `log_config=` so that its own loggers and every worker process use it) sends every logger's records
through one handler that

* puts the fields `bind(**fields)` holds for this task or thread, and the current span's `trace_id` and
  `span_id`, on every record;
* replaces secrets (the configured values, `Bearer <token>`, `sk-...` keys, passwords in URLs) with "***" in
  the message, its arguments, the extra fields and the traceback before anything is formatted;
* writes the line to stderr in the thread that logs. A writer thread behind a queue (QueueHandler) was
  measured on the proxy and lost: fewer requests/s and more CPU per request than writing in place (the GIL
  passing between the event loop and the writer costs more than the write it takes off the request path).

A JSON line: {"ts": "2026-01-02T03:04:05.678Z", "level": "INFO", "logger": "abloop.proxy", "message": "...",
<bound fields>, "trace_id": "<32 hex>", "span_id": "<16 hex>", <extra= fields>, "exc_info": "<traceback>"}.
"""

from __future__ import annotations

import contextlib
import logging
import logging.config
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import IO, Any, Literal

from pythonjsonlogger.orjson import OrjsonFormatter

from store import tracing

LogFormat = Literal["auto", "json", "text"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that log every call (httpx) or every start (alembic's migrations): noise, and on the request path a
# measurable cost (bench/proxy_overhead.py).
QUIET_LOGGERS = ("alembic", "httpx", "faiss.loader", "sentence_transformers")
REDACTED = "***"

_bound: ContextVar[Mapping[str, Any]] = ContextVar("abloop_log_fields", default=MappingProxyType({}))
_CONTEXT = "_abloop_context"  # the record attribute ContextFilter fills (a leading "_": never an extra field)
# A LogRecord's own attributes; anything else on a record came from `extra=`. uvicorn adds `color_message`
# (the message again, with ANSI colours) to some of its records.
_NOT_EXTRA = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName", "color_message"}


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add `fields` to every record logged inside the block, in this task or thread only."""
    token = _bound.set(MappingProxyType({**_bound.get(), **fields}))
    try:
        yield
    finally:
        _bound.reset(token)


def bound() -> dict[str, Any]:
    """The fields `bind` holds here and now."""
    return dict(_bound.get())


def configure_logging(format: LogFormat = "auto", level: str = "INFO", *, secrets: Iterable[str] = (),
                      stream: IO[str] | None = None) -> None:
    """Set up logging for this process (see the module doc). Calling it again replaces the setup."""
    logging.config.dictConfig(logging_config(format, level, secrets=secrets, stream=stream))


def logging_config(format: LogFormat = "auto", level: str = "INFO", *, secrets: Iterable[str] = (),
                   stream: IO[str] | None = None) -> dict[str, Any]:
    """The `logging.config.dictConfig` dict `configure_logging` applies: also uvicorn's `log_config=`.

    format: "json", "text" or "auto" (text when `stream`, default stderr, is a terminal). `stream` is for tests.
    """
    level = level.upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"unknown log level {level!r}: DEBUG, INFO, WARNING, ERROR or CRITICAL")
    _resolve(format, stream)  # a bad format fails here, not inside dictConfig
    return {
        "version": 1,
        "disable_existing_loggers": False,  # module-level loggers made before this call keep logging
        "handlers": {"default": {"()": make_handler, "format": format, "secrets": list(secrets), "stream": stream}},
        "root": {"level": level, "handlers": ["default"]},
        "loggers": {
            # uvicorn's loggers log through ours; its access log stays off (the proxy logs each request itself).
            "uvicorn": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level, "handlers": [], "propagate": True},
            "uvicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
            **{name: {"level": max(logging.WARNING, logging.getLevelName(level))} for name in QUIET_LOGGERS},
        },
    }


def make_handler(format: LogFormat = "auto", secrets: Iterable[str] = (), stream: IO[str] | None = None
                 ) -> logging.Handler:
    """The one handler every setup uses: bound fields and trace ids, secrets redacted, JSON or text, to `stream`
    (default: the current stderr). For a process whose logging another framework owns (a Prefect flow run)."""
    handler = logging.StreamHandler(stream) if stream else StderrHandler()
    handler.setFormatter(JsonFormatter() if _resolve(format, stream) == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactFilter(secrets))
    return handler


def _resolve(format: str, stream: IO[str] | None) -> Literal["json", "text"]:
    if format not in ("auto", "json", "text"):
        raise ValueError(f"unknown log format {format!r}: auto, json or text")
    if format == "auto":
        return "text" if (stream or sys.stderr).isatty() else "json"
    return format  # type: ignore[return-value]


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, as logging's own last-resort handler does.

    A handler that kept the stderr of the moment it was configured would write to a closed file once something
    swaps `sys.stderr` (pytest's capture between tests, a daemon redirecting its output).
    """

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> IO[str]:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: IO[str]) -> None:  # StreamHandler.__init__ assigns one; always stderr here
        pass


# ----------------------------------------------------------------------------------------------------------------
# Filters


class ContextFilter(logging.Filter):
    """Puts the bound fields and the current span's trace_id/span_id on the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = dict(_bound.get())
        ids = tracing.current_ids()
        if ids is not None:
            context["trace_id"], context["span_id"] = ids
        setattr(record, _CONTEXT, context)
        return True


class RedactFilter(logging.Filter):
    """Replaces secrets with "***" in the message (arguments merged in), extra and bound fields, and traceback.

    Besides the configured values: `Bearer <token>`, OpenAI-style `sk-...` keys and the password of a URL.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        literals = sorted({s for s in secrets if s}, key=len, reverse=True)  # the longest match first
        shapes = [
            r"(?P<bearer>\b[Bb]earer\s+)[A-Za-z0-9\-._~+/]+=*",
            r"\bsk-[A-Za-z0-9_\-]{8,}",
            r"(?P<userinfo>://[^\s/:@]*:)[^\s/@]+(?=@)",
        ]
        self._pattern = re.compile("|".join([re.escape(s) for s in literals] + shapes))
        # Text without any of these cannot match: plain substring tests are far cheaper than the pattern.
        self._markers = (*literals, "earer", "sk-", "://")

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the message: keep both, as text, for the formatter
            message = f"{record.msg} (arguments that do not fit: {record.args!r})"
        record.msg, record.args = message, None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None  # the formatters would format it again, unredacted
        extras = _extras(record)
        context = getattr(record, _CONTEXT, None) or {}
        # Most records hold no secret: one look at all their text decides, instead of one per field. A match in
        # the joined text that no single field has only costs the slow path below, which then finds nothing.
        texts = [message, record.exc_text or "", record.stack_info or ""]
        _collect_text(extras.values(), texts)
        _collect_text(context.values(), texts)
        joined = "\n".join(texts)
        if not any(marker in joined for marker in self._markers) or self._pattern.search(joined) is None:
            return True
        record.msg = self.redact(message)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        record.__dict__.update(self._redact_value(extras))
        setattr(record, _CONTEXT, self._redact_value(context))
        return True

    def redact(self, text: str) -> str:
        return self._pattern.sub(self._replace, text)

    @staticmethod
    def _replace(match: re.Match[str]) -> str:
        return (match.group("bearer") or match.group("userinfo") or "") + REDACTED

    def _redact_value(self, value: Any) -> Any:
        if type(value) in _PLAIN:
            return value
        if isinstance(value, Mapping):
            return {key: self._redact_value(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self._redact_value(item) for item in value]
        return self.redact(str(value))  # text, or an object a formatter would print as text anyway


_PLAIN = {int, float, bool, type(None)}  # values that cannot hold a secret


def _collect_text(values: Iterable[Any], texts: list[str]) -> None:
    """Append every piece of text in `values` (nested in dicts and lists too) to `texts`."""
    for value in values:
        if type(value) is str:
            texts.append(value)
        elif type(value) in _PLAIN:
            continue
        elif isinstance(value, Mapping):
            _collect_text(value.values(), texts)
        elif isinstance(value, list | tuple):
            _collect_text(value, texts)
        else:
            texts.append(str(value))


# ----------------------------------------------------------------------------------------------------------------
# Formatters


class JsonFormatter(OrjsonFormatter):
    """One JSON object per line: ts, level, logger, message, bound fields, trace_id/span_id, extras, exc_info.

    Serialised with orjson: a quarter less CPU per line than the standard library's json (python-json-logger's
    default), which the proxy pays on every search.
    """

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["ts"] = _utc_timestamp(record)
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["message"] = record.message
        log_data.update(getattr(record, _CONTEXT, ()))
        log_data.update(_extras(record))
        log_data.update(message_dict)  # exc_info, stack_info


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, then ` key=value` for each bound and extra field."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # the first line; a traceback follows it
        fields = {**getattr(record, _CONTEXT, {}), **_extras(record)}
        return super().formatMessage(record) + "".join(f" {key}={value}" for key, value in fields.items())


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record got from `extra=`."""
    return {key: value for key, value in record.__dict__.items()
            if key not in _NOT_EXTRA and not key.startswith("_")}


def _utc_timestamp(record: logging.LogRecord) -> str:
    """ISO 8601 in UTC with milliseconds: 2026-01-02T03:04:05.678Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
