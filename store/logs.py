"""One logging setup for every abloop process: JSON lines for a log pipeline, or text for a terminal.

`configure_logging` (or `logging_config`, the same setup as a `logging.config.dictConfig` dict, which uvicorn
takes as `log_config=` so that its own loggers and every worker process use it) sends every logger's records
through one handler that

* puts the fields `bind(**fields)` holds for this task or thread, and the current span's `trace_id` and
  `span_id`, on every record;
* replaces secrets (the configured values, `Bearer <token>`, `sk-...` keys, passwords in URLs) with "***" in
  the message, its arguments, the extra fields and the traceback before anything is formatted;
* writes the lines to stderr in batches (`LineWriter`): a WARNING or worse at once, with every line before
  it; the rest within 0.1 s. One write per line cost the proxy more than formatting it: each write releases
  the GIL, and the event loop then waits to get it back (measured: docs/BENCHMARKS.md, "Observability
  overhead"). A writer thread behind a queue (QueueHandler) was measured too and lost: it hands the GIL
  over once per line.

`redact_at_source` applies the same redaction to the records of loggers whose handlers are not ours (Prefect's
run loggers, whose API handler sends each record to the Prefect server).

A JSON line: {"ts": "2026-01-02T03:04:05.678Z", "level": "INFO", "logger": "abloop.proxy", "message": "...",
<bound fields>, "trace_id": "<32 hex>", "span_id": "<16 hex>", <extra= fields>, "exc_info": "<traceback>"}.
"""

from __future__ import annotations

import contextlib
import logging
import logging.config
import os
import re
import sys
import threading
import time
import traceback
import weakref
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
_EXTRAS = "_abloop_extras"  # the record's extra fields, once found
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
    _skip_unused_record_fields()
    handler = LineWriter(stream)
    handler.setFormatter(JsonFormatter() if _resolve(format, stream) == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactFilter(secrets))
    return handler


def redact_at_source(loggers: Iterable[logging.Logger], secrets: Iterable[str] = ()) -> None:
    """Redact the records made on each of `loggers`, as store.logs' handler does, before any handler gets them.

    For loggers whose handlers another framework owns, such as Prefect's run loggers, whose API handler sends
    each record to the Prefect server before the record reaches the root logger's handlers. A filter on the
    logger, unlike one on a handler, also covers the handlers the framework attaches later (its dictConfig
    replaces handlers, not filters); but not the records of the loggers' children, which reach the same handlers
    without passing it. Calling this again changes nothing; a call with other secrets replaces the earlier
    call's filter.
    """
    literals = RedactFilter.literals_of(secrets)
    redact: RedactFilter | None = None  # built only where needed: it compiles a pattern, and flows call this per run
    for logger in loggers:
        earlier = [f for f in logger.filters if isinstance(f, RedactFilter)]
        if [f._literals for f in earlier] == [literals]:
            continue
        redact = redact or RedactFilter(literals)
        logger.addFilter(redact)  # before the earlier filter goes: no record can pass between them with neither
        for filter_ in earlier:
            logger.removeFilter(filter_)


def _skip_unused_record_fields() -> None:
    """Stop logging from collecting, for every record, what no line of ours prints: the caller's file, line and
    function (a walk up the stack), the thread's and the process's names and ids. The switches of the logging
    HOWTO's "Optimization" section; about a fifth of the CPU a line costs, in process."""
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


def _resolve(format: str, stream: IO[str] | None) -> Literal["json", "text"]:
    if format not in ("auto", "json", "text"):
        raise ValueError(f"unknown log format {format!r}: auto, json or text")
    if format == "auto":
        return "text" if (stream or sys.stderr).isatty() else "json"
    return format  # type: ignore[return-value]


class LineWriter(logging.StreamHandler):
    """A stream handler that writes its lines in batches: one write, and one release of the GIL, for many lines.

    A record of level WARNING or worse is written at once, after the lines still pending; the others within
    `flush_interval_s` (a flusher thread, started on the first line a process writes and asleep while there
    is nothing to write), or as soon as `max_pending_chars` are pending. `flush()` and `close()` write what is
    pending, and logging flushes every handler at exit; a process killed with SIGKILL loses at most the last
    `flush_interval_s` of INFO lines.

    `stream` None: whatever `sys.stderr` is when the lines are written, as logging's own last-resort handler
    does; a handler that kept the stderr of the moment it was configured would write to a closed file once
    something swaps `sys.stderr` (pytest's capture between tests, a daemon redirecting its output).
    """

    def __init__(self, stream: IO[str] | None = None, *, flush_interval_s: float = 0.1,
                 max_pending_chars: int = 64 * 1024) -> None:
        super().__init__(stream)
        self._follow_stderr = stream is None
        self.flush_interval_s = flush_interval_s
        self.max_pending_chars = max_pending_chars
        self._pending: list[str] = []
        self._pending_chars = 0
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._flusher_pid = 0  # the process whose flusher thread runs (a forked child starts its own)
        _line_writers.add(self)

    @property
    def stream(self) -> IO[str]:  # type: ignore[override]
        return sys.stderr if self._follow_stderr else self._stream

    @stream.setter
    def stream(self, value: IO[str]) -> None:  # StreamHandler.__init__ and setStream assign it
        self._stream = value

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        with self.lock:
            self._pending.append(line)
            self._pending_chars += len(line)
            if (record.levelno >= logging.WARNING or self._pending_chars >= self.max_pending_chars
                    or self._closing.is_set()):
                self._write_pending()
            elif not self._wake.is_set():  # the flusher is asleep: this is the first line of a batch
                if self._start_flusher():
                    self._wake.set()
                else:
                    self._write_pending()

    def flush(self) -> None:
        with self.lock:
            self._write_pending()

    def close(self) -> None:
        with self.lock:
            self._closing.set()  # the flusher ends, and later lines are written at once
            self._write_pending()
        self._wake.set()
        super().close()

    def _write_pending(self) -> None:
        """Write and flush what is pending (the lock is held)."""
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._pending_chars = 0
        stream = self.stream
        try:
            stream.write(text)
            stream.flush()
        except ValueError:  # a closed stream: nothing left to write to
            pass
        except Exception:
            if logging.raiseExceptions:
                traceback.print_exc(file=sys.__stderr__)

    def _start_flusher(self) -> bool:
        """Whether a flusher runs in this process (started now if need be; none can be once Python is exiting)."""
        if self._flusher_pid == os.getpid():
            return True
        try:
            threading.Thread(target=self._flush_periodically, name="abloop-log-writer", daemon=True).start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown": this line is written at once
            return False
        self._flusher_pid = os.getpid()
        return True

    def _after_fork_in_child(self) -> None:
        """A forked child has no flusher thread: its next line starts one (`_start_flusher` sees another pid once
        `_wake` is clear). The lines pending at the fork are the parent's to write: the child would duplicate them."""
        self._pending.clear()
        self._pending_chars = 0
        self._wake.clear()

    def _flush_periodically(self) -> None:
        while not self._closing.is_set():
            self._wake.wait()
            self._closing.wait(self.flush_interval_s)  # lines that come meanwhile join this write
            self._wake.clear()  # before the write: a line pending after it sets the event again
            self.flush()


_line_writers: weakref.WeakSet[LineWriter] = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [writer._after_fork_in_child() for writer in list(_line_writers)])


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
        literals = self.literals_of(secrets)
        self._literals = literals  # what tells this filter from one with other secrets (redact_at_source)
        shapes = [
            r"(?P<bearer>\b[Bb]earer\s+)[A-Za-z0-9\-._~+/]+=*",
            r"\bsk-[A-Za-z0-9_\-]{8,}",
            r"(?P<userinfo>://[^\s/:@]*:)[^\s/@]+(?=@)",
        ]
        self._pattern = re.compile("|".join([re.escape(s) for s in literals] + shapes))
        # Text without any of these cannot match: plain substring tests are far cheaper than the pattern.
        self._markers = (*literals, "earer", "sk-", "://")

    @staticmethod
    def literals_of(secrets: Iterable[str]) -> tuple[str, ...]:
        """The configured secrets as the filter matches them: distinct, non-empty, the longest first."""
        return tuple(sorted({s for s in secrets if s}, key=lambda s: (-len(s), s)))

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
        redacted = self._redact_value(extras)
        record.__dict__.update(redacted)
        record.__dict__[_EXTRAS] = redacted
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
    """The fields a record got from `extra=` (found once per record: the filters and the formatter all ask)."""
    extras = record.__dict__.get(_EXTRAS)
    if extras is None:
        extras = {key: value for key, value in record.__dict__.items() if key not in _NOT_EXTRA and key[0] != "_"}
        record.__dict__[_EXTRAS] = extras
    return extras


_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def _utc_timestamp(record: logging.LogRecord) -> str:
    """ISO 8601 in UTC with milliseconds: 2026-01-02T03:04:05.678Z."""
    global _second
    whole = int(record.created)
    second, text = _second
    if whole != second:  # one strftime per second, not per line (two threads racing both compute it)
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, text)
    return f"{text}.{int(record.msecs):03d}Z"
