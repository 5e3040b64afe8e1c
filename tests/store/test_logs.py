"""store/logs.py: JSON and text lines, bound fields and trace ids, secrets kept out, format and level selection."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from pydantic import ValidationError

from store import tracing
from store.config import Settings
from store.logs import RedactFilter, bind, bound, configure_logging, redact_at_source

log = logging.getLogger("abloop.test")


@contextmanager
def captured_logs(format: str = "json", level: str = "INFO", *, secrets=(),
                  stream: io.StringIO | None = None) -> Iterator[Callable[[], list[str]]]:
    """`configure_logging` writing to a buffer; yields a function that returns the lines written so far.

    Puts the root logger's handlers and level back afterwards (pytest's own capture included).
    """
    stream = stream if stream is not None else io.StringIO()
    with _root_logger_restored() as root:
        configure_logging(format, level, secrets=secrets, stream=stream)

        def lines() -> list[str]:
            for handler in root.handlers:
                handler.flush()
            return stream.getvalue().splitlines()

        yield lines


@contextmanager
def _root_logger_restored() -> Iterator[logging.Logger]:
    """The root logger; its handlers (closed) and level put back as they were afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def records(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_line_shape_bound_fields_and_extras():
    with captured_logs() as lines:
        with bind(request_id="r-1", arm="control"):
            with bind(arm="candidate"):  # an inner bind overrides, and is undone on exit
                assert bound() == {"request_id": "r-1", "arm": "candidate"}
                log.info("inner %s", "done", extra={"timings_ms": {"total": 1.5}, "http_status": 200})
            log.warning("outer")
        log.info("outside")
        out = records(lines())
    assert bound() == {}
    assert [r["message"] for r in out] == ["inner done", "outer", "outside"]
    inner, outer, outside = out
    assert list(inner) == ["ts", "level", "logger", "message", "request_id", "arm", "timings_ms", "http_status"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", inner["ts"])
    assert (inner["level"], inner["logger"]) == ("INFO", "abloop.test")
    assert (inner["request_id"], inner["arm"], inner["timings_ms"], inner["http_status"]) == (
        "r-1", "candidate", {"total": 1.5}, 200)
    assert (outer["level"], outer["arm"]) == ("WARNING", "control")
    assert "request_id" not in outside and "trace_id" not in outside


def test_a_line_inside_a_span_carries_its_trace_and_span_id(span_exporter):
    with captured_logs() as lines:
        with tracing.span("work") as span:
            log.info("inside")
        log.info("after")
        inside, after = records(lines())
    context = span.get_span_context()
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert "trace_id" not in after


async def test_bound_fields_stay_with_their_task():
    async def handle(request_id: str, gate: asyncio.Event, other: asyncio.Event) -> None:
        with bind(request_id=request_id):
            gate.set()
            await other.wait()  # both tasks are inside their bind at once
            log.info("handled")

    with captured_logs() as lines:
        first, second = asyncio.Event(), asyncio.Event()
        await asyncio.gather(handle("a", first, second), handle("b", second, first))
        out = records(lines())
    assert sorted(r["request_id"] for r in out) == ["a", "b"]


def test_an_exception_is_one_field_of_its_line():
    with captured_logs() as lines:
        try:
            raise RuntimeError("the cause")
        except RuntimeError:
            log.exception("it failed")
        (out,) = records(lines())
    assert out["message"] == "it failed"
    assert "RuntimeError: the cause" in out["exc_info"] and "Traceback" in out["exc_info"]


@pytest.mark.parametrize("format", ["json", "text"])
def test_secrets_never_reach_a_line(format):
    settings = Settings(
        admin_token="adm-7c1f0e9a-token",
        llm_api_key="upstream-key-93b2d4",
        slack_webhook_url="https://hooks.example.com/services/T000/B000/XyZsecretpath",
        database_url="postgresql://abloop:db%40pass-51@db.internal:5432/abloop",
        redis_url="redis://:redis-pass-77@cache.internal:6379/0",
    )
    secrets = settings.secret_values()
    assert {"adm-7c1f0e9a-token", "upstream-key-93b2d4", "db%40pass-51", "db@pass-51", "redis-pass-77"} <= set(secrets)
    with captured_logs(format, secrets=secrets) as lines:
        log.info("admin call with token %s", "adm-7c1f0e9a-token")
        log.info("upstream request headers", extra={"headers": {"Authorization": "Bearer upstream-key-93b2d4"}})
        log.warning("retrying with Authorization: Bearer eyJhbGciOi.J9.unlisted-token and key sk-proj-abcdefgh12345")
        log.info("posting to %s", settings.slack_webhook_url.get_secret_value())
        with bind(database="postgresql://abloop:db@pass-51@db.internal/abloop"):
            log.info("connecting to postgresql://abloop:other-password@db.internal/abloop")
        try:
            raise ConnectionError("redis://:redis-pass-77@cache.internal:6379/0 refused")
        except ConnectionError:
            log.exception("cache down")
        text = "\n".join(lines())
    for secret in ["adm-7c1f0e9a-token", "upstream-key-93b2d4", "XyZsecretpath", "db%40pass-51", "db@pass-51",
                   "redis-pass-77", "eyJhbGciOi", "unlisted-token", "sk-proj-abcdefgh12345", "other-password"]:
        assert secret not in text, secret
    assert "Bearer ***" in text and "://abloop:***@db.internal" in text
    assert text.count("admin call with token ***") == 1


class _Printed:
    """An object logged as an extra field: a formatter prints its str()."""

    def __str__(self) -> str:
        return "client(key=conf-secret-4471)"


def _with_stack(text: str) -> Callable[[], None]:
    def emit() -> None:
        record = log.makeRecord(log.name, logging.WARNING, __file__, 1, "with a stack", (), None, sinfo=text)
        log.handle(record)
    return emit


# Each record holds one secret, in one place, and nothing else a redaction looks for: a secret found only
# because another one sat in the same record would hide a place that is never searched.
_ONE_SECRET_EACH = {
    "bearer token in the message": lambda: log.info("sent Authorization: Bearer tok.ONLY-one_7"),
    "bearer, lower case": lambda: log.info("header bearer abcDEF123"),
    "upper-case sk- key": lambda: log.info("key sk-ABCDEFGH12345678 in use"),
    "URL password": lambda: log.info("to postgresql://svc:pw-only-9@db.internal/app"),
    "configured value": lambda: log.info("value conf-secret-4471 seen"),
    "bound field": lambda: _bound_line(token="conf-secret-4471"),
    "nested extra": lambda: log.info("nested", extra={"request": {"headers": {"x-key": "conf-secret-4471"}}}),
    "extra list after a number": lambda: log.info("listed", extra={"n": 3, "keys": [1, "conf-secret-4471"]}),
    "extra tuple": lambda: log.info("tupled", extra={"pair": ("a", "Bearer tuple-token-1")}),
    "extra object": lambda: log.info("object", extra={"client": _Printed()}),
    "traceback": lambda: _exception_line(ValueError("bad key conf-secret-4471")),
    "stack": _with_stack("Stack (most recent call last):\n  call(key='conf-secret-4471')"),
}
_HIDDEN = ("tok.ONLY-one_7", "abcDEF123", "ABCDEFGH12345678", "pw-only-9", "conf-secret-4471", "tuple-token-1")


def _bound_line(**fields: str) -> None:
    with bind(**fields):
        log.info("bound")


def _exception_line(error: Exception) -> None:
    try:
        raise error
    except type(error):
        log.exception("failed")


@pytest.mark.parametrize("format", ["json", "text"])
@pytest.mark.parametrize("place", list(_ONE_SECRET_EACH))
def test_a_secret_alone_in_any_part_of_a_record_is_redacted(place: str, format: str) -> None:
    with captured_logs(format, secrets=["conf-secret-4471"]) as lines:
        _ONE_SECRET_EACH[place]()
        text = "\n".join(lines())
    assert text and "***" in text, place
    assert not [secret for secret in _HIDDEN if secret in text], text


def test_redaction_keeps_the_rest_of_a_record() -> None:
    with captured_logs("json", secrets=["conf-secret-4471"]) as lines:
        with bind(request_id="r-1", token="conf-secret-4471"):
            log.info("n=%d", 3, extra={"n": 3, "ok": True, "none": None, "keys": [1, "conf-secret-4471"]})
        (out,) = records(lines())
    assert out["message"] == "n=3" and out["request_id"] == "r-1" and out["token"] == "***"
    assert (out["n"], out["ok"], out["none"], out["keys"]) == (3, True, None, [1, "***"])


def test_the_longest_configured_secret_is_replaced_whole() -> None:
    """One secret the start of another: the longer is replaced whole, not its first part, leaving the rest."""
    with captured_logs("json", secrets=["pre-4471", "pre-4471-and-more"]) as lines:
        log.info("%s | %s", "pre-4471-and-more", "pre-4471")
        (out,) = records(lines())
    assert out["message"] == "*** | ***"


def test_arguments_that_do_not_fit_the_message_are_kept_and_redacted() -> None:
    with captured_logs("json", secrets=["conf-secret-4471"]) as lines:
        log.info("%s and %s", "conf-secret-4471")
        (out,) = records(lines())
    assert out["message"] == "%s and %s (arguments that do not fit: ('***',))"


class _Recorder(logging.Handler):
    """A handler of another framework's: it redacts nothing, and keeps each message it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(self.format(record))


def test_a_logger_redacted_at_source_gives_every_handler_redacted_records() -> None:
    logger = logging.getLogger("abloop.test.framework")
    recorder = _Recorder()
    logger.addHandler(recorder)
    try:
        redact_at_source([logger], ["conf-secret-4471"])
        redact_at_source([logger], ["conf-secret-4471"])  # again: nothing changes
        [first] = [f for f in logger.filters if isinstance(f, RedactFilter)]
        logger.warning("key %s, Bearer tok.one_7", "conf-secret-4471")
        logger.exception("failed", exc_info=ValueError("bad key conf-secret-4471"))

        redact_at_source([logger], ["other-secret-9"])  # other secrets: a filter with them in its place
        [second] = [f for f in logger.filters if isinstance(f, RedactFilter)]
        logger.warning("conf-secret-4471 other-secret-9")
    finally:
        logger.removeHandler(recorder)
        logger.filters.clear()
    assert second is not first
    assert recorder.messages[:2] == ["key ***, Bearer ***", "failed\nValueError: bad key ***"]
    assert recorder.messages[2] == "conf-secret-4471 ***"


def test_format_auto_is_text_on_a_terminal_and_json_otherwise():
    with captured_logs("auto", stream=_Terminal()) as lines:
        with bind(request_id="r-9"):
            log.info("hello", extra={"arm": "control"})
        (terminal,) = lines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO abloop.test: hello request_id=r-9 arm=control",
                        terminal)
    with captured_logs("auto") as lines:
        log.info("hello")
        (piped,) = records(lines())
    assert piped["message"] == "hello"
    with captured_logs("json", stream=_Terminal()) as lines:
        log.info("hello")
        assert records(lines())[0]["message"] == "hello"
    with captured_logs("text") as lines:
        log.info("hello")
        assert lines()[0].endswith(" INFO abloop.test: hello")


def test_level_filters_and_an_off_level_formats_nothing():
    formatted = []

    class Expensive:
        def __str__(self) -> str:
            formatted.append(1)
            return "expensive"

    with captured_logs("json", "WARNING") as lines:
        log.info("dropped %s", Expensive())
        log.warning("kept")
        logging.getLogger("httpx").warning("quiet loggers still say what matters")
        assert [r["message"] for r in records(lines())] == ["kept", "quiet loggers still say what matters"]
    assert formatted == []
    with captured_logs("json", "debug") as lines:
        log.debug("seen")
        logging.getLogger("httpx").info("HTTP Request: POST ...")  # per-call noise stays off even at DEBUG
        assert [r["message"] for r in records(lines())] == ["seen"]
    with pytest.raises(ValueError, match="log level"):
        configure_logging("json", "LOUD")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml", "INFO")


def test_uvicorns_loggers_log_through_ours_and_its_access_log_stays_off():
    """uvicorn configures its own handlers (and they would print a second, unformatted copy); ours replaces
    them. The proxy logs each request itself, so uvicorn's access lines would only double them."""
    for name, propagate in (("uvicorn", False), ("uvicorn.error", False), ("uvicorn.access", True)):
        uvicorn_logger = logging.getLogger(name)  # the opposite of what the setup must leave
        uvicorn_logger.addHandler(logging.StreamHandler(io.StringIO()))
        uvicorn_logger.setLevel(logging.CRITICAL if propagate is False else logging.DEBUG)
        uvicorn_logger.propagate = propagate
    logging.getLogger("httpx").setLevel(logging.DEBUG)
    with captured_logs("json", "DEBUG") as lines:
        logging.getLogger("uvicorn").debug("server")
        logging.getLogger("uvicorn.error").info("started")
        logging.getLogger("uvicorn.access").info('"GET / HTTP/1.1" 200')
        logging.getLogger("uvicorn.access").warning("access warning")
        logging.getLogger("httpx").info("HTTP Request: POST ...")
        out = records(lines())
        assert [(r["logger"], r["message"]) for r in out] == [("uvicorn", "server"), ("uvicorn.error", "started")]
        assert all(not logging.getLogger(name).handlers for name in ("uvicorn", "uvicorn.error", "uvicorn.access"))
        assert logging.getLogger("uvicorn.access").getEffectiveLevel() == logging.WARNING


def test_the_defaults_pick_the_format_by_terminal_at_info():
    from store.logs import logging_config

    config = logging_config()
    assert config["root"]["level"] == "INFO" and config["handlers"]["default"]["format"] == "auto"
    with _root_logger_restored():
        configure_logging()  # what a process with no settings gets
        record = logging.LogRecord("abloop.test", logging.INFO, __file__, 1, "m", (), None)
        # What no line prints is not collected (the logging HOWTO's "Optimization" switches).
        assert (record.thread, record.process, record.processName) == (None, None, None)


def test_the_timestamp_is_utc_with_milliseconds_for_each_line():
    from store.logs import JsonFormatter

    formatter = JsonFormatter()
    stamps = []
    for created, msecs in ((1767323045.678, 678), (1767323045.9, 900), (1767323046.001, 1), (1767409445.25, 250)):
        record = logging.makeLogRecord({"msg": "at", "created": created, "msecs": msecs})
        stamps.append(json.loads(formatter.format(record))["ts"])
    assert stamps == ["2026-01-02T03:04:05.678Z", "2026-01-02T03:04:05.900Z", "2026-01-02T03:04:06.001Z",
                      "2026-01-03T03:04:05.250Z"]


def test_configuring_twice_keeps_one_handler():
    stream = io.StringIO()
    with captured_logs(stream=stream) as lines:
        configure_logging("json", "INFO", stream=stream)
        assert len(logging.getLogger().handlers) == 1
        log.info("once")
        assert [r["message"] for r in records(lines())] == ["once"]


def test_settings_read_log_format_level_and_user_id(monkeypatch):
    monkeypatch.setenv("LOG_FORMAT", "JSON")
    monkeypatch.setenv("LOG_LEVEL", "warning")
    monkeypatch.setenv("LOG_USER_ID", "true")
    settings = Settings(_env_file=None)
    assert (settings.log_format, settings.log_level, settings.log_user_id) == ("json", "WARNING", True)
    monkeypatch.setenv("LOG_FORMAT", "yaml")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)
    monkeypatch.delenv("LOG_FORMAT")
    monkeypatch.delenv("LOG_LEVEL")
    monkeypatch.delenv("LOG_USER_ID")
    defaults = Settings(_env_file=None)
    assert (defaults.log_format, defaults.log_level, defaults.log_user_id) == ("auto", "INFO", False)



# --------------------------------------------------------------------------------------------
# LineWriter: lines written in batches, in order, none lost


def _line_writer(stream, format: str = "%(message)s", **options):
    from store.logs import LineWriter

    writer = LineWriter(stream, **options)
    writer.setFormatter(logging.Formatter(format))
    return writer


def _emit(writer, message: str, level: int = logging.INFO) -> None:
    writer.handle(logging.makeLogRecord({"levelno": level, "levelname": logging.getLevelName(level), "msg": message}))


def test_info_lines_wait_for_a_warning_which_writes_them_in_order():
    stream = io.StringIO()
    # flush_interval_s: the flusher will not write during this test
    writer = _line_writer(stream, "%(levelname)s %(message)s", flush_interval_s=3600)
    for n in range(3):
        _emit(writer, f"info {n}")
    assert stream.getvalue() == ""
    _emit(writer, "warned", logging.WARNING)
    assert stream.getvalue().splitlines() == ["INFO info 0", "INFO info 1", "INFO info 2", "WARNING warned"]
    _emit(writer, "after")
    writer.close()  # close writes what is pending, and ends the flusher at once
    assert stream.getvalue().splitlines()[-1] == "INFO after"
    _emit(writer, "closed")  # a line after close is written at once
    assert stream.getvalue().splitlines()[-1] == "INFO closed"


def test_pending_lines_are_written_by_the_flusher_or_when_they_fill_the_buffer():
    stream = io.StringIO()
    writer = _line_writer(stream, flush_interval_s=0.01, max_pending_chars=1000)
    _emit(writer, "soon")
    deadline = time.monotonic() + 10  # the flusher writes within 0.01 s; the deadline only ends a hang
    while stream.getvalue() != "soon\n":
        assert time.monotonic() < deadline, "the flusher never wrote the pending line"
        time.sleep(0.01)
    writer.flush_interval_s = 3600
    _emit(writer, "waits")  # the flusher, asleep again, takes this line: it waits for the next batch
    assert stream.getvalue() == "soon\n"
    _emit(writer, "x" * 993)  # with "waits\n", 1000 chars pending
    assert stream.getvalue() == "soon\nwaits\n" + "x" * 993 + "\n"
    flushers = [t for t in threading.enumerate() if t.name == "abloop-log-writer"]
    assert flushers and all(t.daemon for t in flushers)  # a flusher never keeps a process from exiting
    writer.close()


def test_many_short_lines_fill_the_buffer_too():
    stream = io.StringIO()
    writer = _line_writer(stream, flush_interval_s=3600, max_pending_chars=30)
    for n in range(9):
        _emit(writer, f"line {n}")  # 7 chars each: the 5th reaches 30
        assert stream.getvalue().count("\n") == (5 if n >= 4 else 0)
    writer.close()


def test_no_line_is_lost_when_a_process_exits(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import logging, sys\n"
        "from store.logs import configure_logging\n"
        "configure_logging('json', 'INFO')\n"
        "for n in range(5000):\n"
        "    logging.getLogger('abloop.test').info('line %d', n)\n"
        "sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 3
    assert [r["message"] for r in records(done.stderr.splitlines())] == [f"line {n}" for n in range(5000)]


def test_a_forked_child_writes_its_own_lines_once_and_not_the_parents():
    import os

    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as stream:
        writer = _line_writer(stream, flush_interval_s=0.01)
        _emit(writer, "parent, before the fork")
        pid = os.fork()
        if pid == 0:  # the child: one line, written by its own flusher, then exit without logging's shutdown
            _emit(writer, "child")
            deadline = time.monotonic() + 10
            while writer._pending and time.monotonic() < deadline:
                time.sleep(0.01)
            os._exit(0 if not writer._pending else 1)
        assert os.waitpid(pid, 0)[1] == 0, "the child's flusher never wrote its line"
        writer.close()
    with os.fdopen(read_end) as lines:
        assert sorted(lines.read().splitlines()) == ["child", "parent, before the fork"]


def test_a_line_logged_when_no_thread_can_start_is_written_at_once(monkeypatch):
    import threading

    def refuse(self):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    stream = io.StringIO()
    writer = _line_writer(stream, flush_interval_s=3600)
    _emit(writer, "at exit")
    assert stream.getvalue() == "at exit\n"
    writer.close()
