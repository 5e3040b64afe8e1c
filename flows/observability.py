"""Logs and traces for flow runs: one decorator, `@observed`, on every flow.

While an observed flow runs,

* every record logged in it - Prefect's, ours and the libraries' - carries `flow_run_id`, `flow_run_name` and
  `flow_name` (store.logs' `bind`; Prefect's own run loggers add the same names, and `task_run_id` in tasks);
* the records of Prefect's run loggers (`get_run_logger()`'s, and the engine's own lines about the run) have
  their secrets redacted as store.logs redacts them, before any handler gets them: Prefect's API log handler
  sits on those loggers and sends each record to the Prefect server (the UI shows it), before the record
  reaches the root logger's handlers;
* the run's spans are Prefect's run telemetry (prefect/telemetry/run_telemetry.py): a span per flow run with
  a child per task run, on whatever tracer provider store.tracing installed.

A process that a Prefect worker started for one flow run (PREFECT__FLOW_RUN_ID is set) has nobody else to set
up its logs and traces, so the first observed flow does it there: store.logs from LOG_FORMAT / LOG_LEVEL (JSON
on a worker's pipe) and OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set. Prefect has opened the run's span
before that, on the no-op provider, so a stand-in span with Prefect's name and attributes takes its place and
the task spans nest under it as they would under Prefect's. Anywhere else (the `abloop` commands, tests) the
host process has set up its logs and traces already and keeps its own.

Prefect's own processes (the worker, and the flow-run process until the flow function starts) log through
Prefect's logging setup; with PREFECT_LOGGING_HANDLERS_CONSOLE_FORMATTER=json and
PREFECT_LOGGING_FORMATTERS_JSON_CLASS=flows.observability.PrefectJsonFormatter in the worker's environment
their lines are store.logs' JSON lines too (docs/OBSERVABILITY.md).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from store.logs import JsonFormatter, bind, redact_at_source

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.context import FlowRunContext

SERVICE_NAME = "abloop-flows"  # OTEL_SERVICE_NAME overrides it
# The loggers get_run_logger() and Prefect's engine log a run's lines to; Prefect's logging.yml puts its API log
# handler on each.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
F = TypeVar("F", bound="Flow")

_process_set_up = False


def observed(flow: F) -> F:
    """Decorate a Prefect flow (put it above ``@flow``) so that its runs log and trace as this module says.

    It wraps the flow's function after Prefect has read it, so the flow keeps its own version (the hash of its
    file) and parameter schema.
    """
    fn = flow.fn

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        if context is None:  # the bare function, called without Prefect
            return fn(*args, **kwargs)
        _set_up_process()
        with bind(**run_fields(context)), _run_span(context):
            return fn(*args, **kwargs)

    # Prefect validates a run's parameters against the signature it finds, resolving names in this
    # wrapper's module: the flow's own annotations, resolved in the flow's module, go with it.
    run.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    run.observed = True  # type: ignore[attr-defined]  # tests/flows/test_observability.py checks every flow
    flow.fn = run
    return flow


class PrefectJsonFormatter(JsonFormatter):
    """store.logs' JSON line, in the shape Prefect's logging.yml builds a formatter: ``class(fmt, datefmt, style)``
    (Prefect's JSON formatter takes those; a format string means nothing to a JSON line)."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None, style: str = "%", validate: bool = True,
                 *, defaults: dict[str, Any] | None = None) -> None:
        super().__init__()


def run_fields(context: FlowRunContext) -> dict[str, str]:
    """The names Prefect's run loggers use, so that our records and Prefect's are searched alike."""
    return {"flow_run_id": str(context.flow_run.id), "flow_run_name": context.flow_run.name,
            "flow_name": context.flow.name}


def _set_up_process() -> None:
    """Redacted run logs in every process that runs a flow; logs and traces for a process a worker started for
    one flow run (its first run only).

    The redaction is put in place at every run: a host process (an `abloop` command, the demo) set up its logs
    before it imported Prefect, which then attached its handlers to the run loggers; and the secrets are the
    settings of the moment. Once in place, it is a no-op.
    """
    global _process_set_up
    from store.config import Settings

    settings = Settings()
    secrets = settings.secret_values()
    _redact_run_logs(secrets)
    if _process_set_up or not os.environ.get("PREFECT__FLOW_RUN_ID"):
        return
    from store.tracing import configure_tracing

    _log_through_store_logs(settings.log_format, settings.log_level, secrets)
    configure_tracing(SERVICE_NAME)
    _process_set_up = True


def _redact_run_logs(secrets: list[str]) -> None:
    """Prefect's run loggers redact their records before any handler, Prefect's API and console ones too, gets
    them: a run's line can quote an upstream's error body, and with it a key."""
    redact_at_source([logging.getLogger(name) for name in RUN_LOGGERS], secrets)


def _log_through_store_logs(format: str, level: str, secrets: list[str]) -> None:
    """store.logs' handler in place of Prefect's console handler on the root logger, and Prefect's run loggers
    redacted as that handler redacts.

    Not `configure_logging`: a fresh dictConfig closes every handler in the process, Prefect's API log handler
    too (the run's logs would stop reaching the Prefect UI), and flushing that one under logging's lock waits
    for a thread that needs the lock: the run hangs. So only Prefect's console handler makes way.
    """
    from prefect.logging.handlers import PrefectConsoleHandler

    from store.logs import logging_config, make_handler

    _redact_run_logs(secrets)
    root = logging.getLogger()
    for console in [h for h in root.handlers if isinstance(h, PrefectConsoleHandler)]:
        root.removeHandler(console)
    root.addHandler(make_handler(format, secrets))
    config = logging_config(format, level, secrets=secrets)  # the levels, root's and the libraries'
    root.setLevel(config["root"]["level"])
    for logger, settings in config["loggers"].items():
        logging.getLogger(logger).setLevel(settings["level"])


@contextlib.contextmanager
def _run_span(context: FlowRunContext) -> Iterator[None]:
    """Nothing when Prefect's span for this run is recording (or tracing is off); else its stand-in."""
    from store.tracing import is_enabled, span

    if not is_enabled():
        yield
        return
    from opentelemetry import trace

    if trace.get_current_span().is_recording():
        yield
        return
    run = context.flow_run
    attributes = {"prefect.run.name": run.name, "prefect.run.type": "flow", "prefect.run.id": str(run.id),
                  "prefect.flow.name": context.flow.name}
    with span(run.name, attributes):
        yield
