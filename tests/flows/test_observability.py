"""Flow runs as an operator searches them: JSON lines that carry the run's id, a span per run with its tasks below.

Real Prefect runs on the session's test server (tests/flows/conftest.py): the `rollback` flow over a SQLite
store, and a two-line probe flow for records that do not come from Prefect's loggers.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator

import pytest
from prefect import flow, get_run_logger, task

import flows.observability
from flows.observability import observed
from tests.experiment import traffic
from tests.flows.deployments import ROOT

probe_log = logging.getLogger("tests.flows.probe")


@task
def _probe_task() -> str:
    probe_log.info("inside the task")
    probe_log.debug("a detail inside the task")
    return "done"


@observed
@flow(name="observability-probe")
def _probe() -> str:
    probe_log.info("inside the flow")
    return _probe_task()


@pytest.fixture
def worker_process(monkeypatch) -> Iterator[None]:
    """This process as a worker starts it for one flow run: PREFECT__FLOW_RUN_ID set, nothing set up yet.

    Afterwards the root logger gets back its handlers (the run replaces them with store.logs' own).
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(uuid.uuid4()))
    monkeypatch.setattr(flows.observability, "_process_set_up", False)
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()  # writes what is queued
    root.handlers[:] = handlers
    root.setLevel(level)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()  # write out what the handlers buffer


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]  # a line that is not JSON fails here


def test_a_worker_run_logs_json_lines_that_carry_the_run(store, worker_process, monkeypatch, capsys):
    from flows.rollback import rollback

    monkeypatch.setenv("LOG_FORMAT", "json")
    running = traffic.start(store)
    state = rollback(running.id, reason="on-call decision", return_state=True)
    assert state.is_completed()
    _flush_logs()
    run_id = str(state.state_details.flow_run_id)

    lines = _json_lines(capsys.readouterr().err)
    ours = [line for line in lines if line.get("flow_run_id") == run_id]
    messages = [line["message"] for line in ours]
    assert f"experiment {running.id} rolled back; {running.control_model} serves everyone" in messages
    assert "Finished in state Completed()" in messages  # Prefect's own line, in the same shape
    for line in ours:
        assert {"ts", "level", "logger", "message", "flow_run_id", "flow_run_name", "flow_name"} <= set(line)
        assert line["flow_name"] == "rollback"
    task_lines = [line for line in ours if "task_run_id" in line]
    assert task_lines and {line["logger"] for line in task_lines} == {"prefect.task_runs"}


@pytest.mark.parametrize(("level", "expected"), [
    (None, {"inside the flow", "inside the task"}),  # LOG_LEVEL's default, INFO
    ("DEBUG", {"inside the flow", "inside the task", "a detail inside the task"}),
])
def test_records_from_any_logger_inside_a_run_carry_it(worker_process, monkeypatch, capsys, level, expected):
    monkeypatch.setenv("LOG_FORMAT", "json")
    if level:
        monkeypatch.setenv("LOG_LEVEL", level)
    state = _probe(return_state=True)
    assert state.result() == "done"
    _flush_logs()
    run_id = str(state.state_details.flow_run_id)

    probe = {line["message"]: line for line in _json_lines(capsys.readouterr().err)
             if line["logger"] == "tests.flows.probe"}
    assert set(probe) == expected
    assert {line["flow_run_id"] for line in probe.values()} == {run_id}
    assert {line["flow_name"] for line in probe.values()} == {"observability-probe"}


def test_log_format_text_gives_a_worker_run_text_lines(worker_process, monkeypatch, capsys):
    monkeypatch.setenv("LOG_FORMAT", "text")  # not json: "auto" is json here, stderr being no terminal
    assert _probe() == "done"
    _flush_logs()
    probe = [line for line in capsys.readouterr().err.splitlines() if "tests.flows.probe" in line]
    assert len(probe) == 2 and all(" INFO tests.flows.probe: inside the " in line for line in probe), probe


def test_outside_a_worker_process_the_host_keeps_its_logging(store, monkeypatch):
    from flows.rollback import rollback

    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    monkeypatch.setattr(flows.observability, "_process_set_up", False)
    handlers = logging.getLogger().handlers[:]
    rollback(traffic.start(store).id)
    assert logging.getLogger().handlers == handlers
    assert flows.observability._process_set_up is False


LLM_KEY = "llm-key-0123456789-configured"  # a configured secret (LLM_API_KEY) of no known shape
UPSTREAM_TOKEN = "sk-upstream0123456789abcdef"  # a key no setting holds, in an upstream's error body


@task
def _quote_an_upstream_error() -> None:
    get_run_logger().warning("metadata endpoint answered HTTP 401: 'bad key Bearer %s'", UPSTREAM_TOKEN)
    raise RuntimeError(f"upstream said: bad key {UPSTREAM_TOKEN}")  # Prefect logs the task's failure, traceback too


@observed
@flow(name="redaction-probe")
def _leak_secrets() -> None:
    get_run_logger().error(f"no metadata with key {LLM_KEY}")  # flows/ingest.py's shape: the text made up front
    _quote_an_upstream_error(return_state=True)  # its failure is not the flow's


def _api_log_messages(flow_run_id: uuid.UUID) -> list[str]:
    """What Prefect's API log handler sent the server for the run: what the Prefect UI shows."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    for handler in logging.getLogger("prefect.flow_runs").handlers:
        handler.flush()  # the API handler sends its queued records, and waits for the server
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


@pytest.mark.parametrize("process", ["host", "worker"])
def test_run_logs_reach_prefect_with_secrets_redacted(process, request, monkeypatch, caplog):
    """get_run_logger()'s records go to Prefect's API handler, on the run loggers themselves, before the root
    logger's handlers: in a host process (an `abloop` command, the demo) and in a worker's flow-run process."""
    monkeypatch.setenv("LLM_API_KEY", LLM_KEY)
    if process == "worker":
        request.getfixturevalue("worker_process")
    for name in flows.observability.RUN_LOGGERS:  # afterwards they get back their own filters
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "filters", logger.filters[:])
    state = _leak_secrets(return_state=True)
    assert state.is_completed()

    messages = _api_log_messages(state.state_details.flow_run_id)
    assert "no metadata with key ***" in messages
    assert "metadata endpoint answered HTTP 401: 'bad key Bearer ***'" in messages
    [failure] = [m for m in messages if "Traceback" in m]
    assert "RuntimeError: upstream said: bad key ***" in failure
    assert [m for m in messages if LLM_KEY in m or UPSTREAM_TOKEN in m] == []
    # The root logger's handlers (Prefect's console, store.logs', pytest's caplog) get the same redacted records.
    assert "no metadata with key ***" in caplog.messages
    assert [m for m in caplog.messages if LLM_KEY in m or UPSTREAM_TOKEN in m] == []


def test_a_flow_run_is_a_span_with_its_task_runs_below(store, span_exporter):
    from flows.rollback import rollback

    state = rollback(traffic.start(store).id, return_state=True)
    assert state.is_completed()
    run_id = str(state.state_details.flow_run_id)

    spans = span_exporter.get_finished_spans()
    [run] = [s for s in spans if s.attributes.get("prefect.run.type") == "flow"]
    assert run.attributes["prefect.run.id"] == run_id
    assert run.instrumentation_scope.name == "prefect"  # Prefect's own run telemetry, not a stand-in
    tasks = [s for s in spans if s.attributes.get("prefect.run.type") == "task"]
    assert [s.attributes["prefect.run.name"].split("-")[0] for s in tasks] == ["roll_back_experiment"]
    assert all(s.parent.span_id == run.context.span_id and s.context.trace_id == run.context.trace_id
               for s in tasks)


def test_when_tracing_starts_inside_the_run_a_stand_in_span_holds_its_tasks(worker_process, monkeypatch):
    """A worker's flow-run process: Prefect opens the run's span before the flow sets up tracing."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    def configure_tracing(service_name: str) -> bool:  # what store.tracing does with an endpoint set
        monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
        return True

    monkeypatch.setattr("store.tracing.configure_tracing", configure_tracing)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    state = _probe(return_state=True)
    assert state.is_completed()
    provider.shutdown()

    spans = exporter.get_finished_spans()
    [run] = [s for s in spans if s.attributes.get("prefect.run.type") == "flow"]
    assert run.attributes["prefect.run.id"] == str(state.state_details.flow_run_id)
    assert run.instrumentation_scope.name == "abloop"  # the stand-in: Prefect's own span was a no-op
    [child] = [s for s in spans if s.attributes.get("prefect.run.type") == "task"]
    assert child.parent.span_id == run.context.span_id


def test_every_flow_is_observed():
    import importlib

    from prefect import Flow

    found = {}
    for path in (ROOT / "flows").glob("*.py"):
        module = importlib.import_module(f"flows.{path.stem}")
        found |= {value.name: value for value in vars(module).values() if isinstance(value, Flow)}
    assert len(found) == 7
    assert {name for name, value in found.items() if not getattr(value.fn, "observed", False)} == set()


def test_prefects_own_lines_can_be_the_same_json(tmp_path):
    """The two PREFECT_LOGGING_* settings docs/OBSERVABILITY.md gives a worker: Prefect's console lines (the
    worker's, and a flow-run process's until the flow starts) come out as store.logs' JSON lines."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PREFECT_HOME": str(tmp_path), "PREFECT_LOGGING_HANDLERS_CONSOLE_FORMATTER": "json",
           "PREFECT_LOGGING_FORMATTERS_JSON_CLASS": "flows.observability.PrefectJsonFormatter"}
    script = ("import logging; from prefect.logging.configuration import setup_logging; setup_logging(); "
              "logging.getLogger('prefect.workers').warning('polling %s', 'cpu')")  # setup: as `prefect worker` does
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    [line] = _json_lines(done.stderr)
    assert {key: line[key] for key in ("level", "logger", "message")} == {
        "level": "WARNING", "logger": "prefect.workers", "message": "polling cpu"}
    assert line["ts"].endswith("Z")
