"""The `abloop` command. Each subcommand imports what it needs when it runs, so `--help` is instant."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

from serving.options import add_server_arguments
from store.config import apply_runtime_env

apply_runtime_env()  # before anything imports torch


def _settings():
    from store.config import Settings

    return Settings()


def _db():
    """The store at DATABASE_URL, migrated to the newest schema."""
    from store.db import Database

    db = Database(_settings().database_url)
    db.migrate()
    return db


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on (taskset, cpusets)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _default_workers() -> int:
    """WEB_CONCURRENCY when set (the variable uvicorn and gunicorn read), else one worker per usable core."""
    value = os.environ.get("WEB_CONCURRENCY")
    if not value:
        return _usable_cores()
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"abloop proxy: WEB_CONCURRENCY must be a whole number, not {value!r}") from None


def _start_workers(workers: int) -> str:
    """Make ready the parent of several workers; returns the app factory the workers load.

    The store is migrated here, once, not by every worker; the workers' metrics go to one directory
    that /metrics reads whole (proxy/metrics.py).
    """

    _db().dispose()
    metrics_dir = _metrics_dir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by prometheus_client in each worker
    logging.getLogger("abloop.proxy").info("%d workers; store migrated; metrics of all workers in %s",
                                           workers, metrics_dir)
    return "proxy.app:create_worker_app"


def _metrics_dir() -> str:
    """PROMETHEUS_MULTIPROC_DIR for the workers: the operator's, emptied of an earlier server's files (as
    prometheus_client requires), else a fresh temporary directory removed when this process exits."""
    import atexit
    import shutil
    import tempfile

    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not given:
        path = tempfile.mkdtemp(prefix="abloop-metrics-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        return path
    Path(given).mkdir(parents=True, exist_ok=True)
    for stale in Path(given).glob("*.db"):
        stale.unlink(missing_ok=True)
    return given


def cmd_proxy(args: argparse.Namespace) -> None:
    import uvicorn

    if args.workers is None:
        args.workers = _default_workers()
    if args.workers < 1:
        raise SystemExit("abloop proxy: --workers must be at least 1")
    # proxy/ratelimit.py splits each user's budget between the workers (without REDIS_URL).
    os.environ["WEB_CONCURRENCY"] = str(args.workers)
    if args.workers == 1:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # one process: its own registry, no shared files
        app = "proxy.app:create_served_app"
    else:
        app = _start_workers(args.workers)
    uvicorn.run(app, factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=args.log_level, access_log=False, log_config=_log_config(args))


def cmd_index_build(args: argparse.Namespace) -> None:
    from retrieval.build import index_version
    from retrieval.corpus import load_corpus

    settings = _settings()
    documents = load_corpus(args.corpus)
    extraction = _extract_metadata(documents, settings) if settings.metadata_api_base else None
    built = index_version(documents, index_dir=str(settings.index_dir), embedding_model=settings.embedding_model,
                          kind=args.kind, extraction=extraction)
    print(json.dumps({"index_dir": str(settings.index_dir), **built,
                      "metadata": built["metadata"] if extraction is not None else "off"}))


def _extract_metadata(documents, settings):
    """Title, tags and category from METADATA_API_BASE, as the `ingest` flow does; failures index without it."""
    from retrieval.metadata import extract_documents

    return extract_documents(documents, settings.metadata_api_base, settings.metadata_model, settings.llm_key(),
                             settings.llm_timeout_s)


def cmd_serve_model(args: argparse.Namespace) -> None:
    from serving.server import serve_from_args

    serve_from_args(args)


def cmd_migrate(_args: argparse.Namespace) -> None:
    from store.db import Database

    db = Database(_settings().database_url)
    db.migrate()
    print(json.dumps({"database": db.engine.url.render_as_string(hide_password=True), "migrated": True}))


def cmd_status(args: argparse.Namespace) -> None:
    from experiment.status import describe, render
    from retrieval.index import IndexStore

    settings = _settings()
    status = describe(_db(), experiment_id=args.experiment)
    status["index_version"] = IndexStore(settings.index_dir).current_version()
    print(json.dumps(status, indent=2, default=str) if args.json else render(status))


def cmd_evaluate(args: argparse.Namespace) -> None:
    import experiment
    from experiment.decision import Policy

    analysis = experiment.evaluate(_db(), args.experiment, Policy.from_settings(_settings()))
    if args.json:
        print(json.dumps(analysis.to_dict(), default=str))
        return
    from experiment.status import render_analysis

    print(render_analysis(analysis.to_dict()))


def cmd_report(args: argparse.Namespace) -> None:
    if args.weekly:
        from experiment.report import write_weekly_report

        path = write_weekly_report(_db(), args.week_ending, Path(args.out))
        print(json.dumps({"report": str(path)}))
        return
    if args.week_ending is not None:
        raise SystemExit("abloop report: --week-ending goes with --weekly")
    from experiment.decision import Policy
    from experiment.report import write_report

    path = write_report(_db(), args.experiment, Path(args.out), Policy.from_settings(_settings()))
    print(json.dumps({"report": str(path)}))


def _conclude(args: argparse.Namespace, outcome: str, operation: Callable[..., Any], **options: Any) -> None:
    """Promote or roll back through experiment.lifecycle; a refusal is one line and a non-zero exit."""
    from experiment import lifecycle

    refusals = (lifecycle.ExperimentNotFound, lifecycle.NoPromoteDecision, lifecycle.ExperimentNotRunning)
    try:
        fresh = operation(_db(), args.experiment, via="cli", **options)
    except refusals as error:
        raise SystemExit(f"not {outcome.replace('_', ' ')}: {error}") from None
    print(json.dumps({outcome: args.experiment, "new_experiment": fresh.id,
                      "control": {"base_url": fresh.control_base_url, "model": fresh.control_model}}))


def cmd_promote(args: argparse.Namespace) -> None:
    from experiment import lifecycle
    from experiment.decision import Policy

    _conclude(args, "promoted", lifecycle.promote, force=args.force, policy=Policy.from_settings(_settings()))


def cmd_rollback(args: argparse.Namespace) -> None:
    from experiment import lifecycle

    _conclude(args, "rolled_back", lifecycle.rollback, reason=args.reason)


def _library_output_to_stderr():
    """stdout carries only the command's JSON (so it can be piped to jq); the trainer prints its log dicts."""
    return contextlib.redirect_stdout(sys.stderr)


def _resolve_base(base: str) -> Path:
    from serving.model import resolve_base_model

    return resolve_base_model(base)


def cmd_dataset_build(args: argparse.Namespace) -> None:
    from training.dataset import build_dataset

    db = _db()
    with _library_output_to_stderr():
        card = build_dataset(db, Path(args.out), min_rating=args.min_rating,
                             semantic_threshold=args.semantic_threshold)
    print(json.dumps(card.to_dict(), indent=2, default=str))


def cmd_train(args: argparse.Namespace) -> None:
    from training.train import train_lora

    db = _db()
    with _library_output_to_stderr():
        result = train_lora(Path(args.data), Path(args.out), base_model_dir=_resolve_base(args.base),
                            max_steps=args.max_steps, epochs=args.epochs, learning_rate=args.learning_rate,
                            batch_size=args.batch_size, load_in_4bit=args.load_in_4bit, packing=args.packing,
                            lora_dropout=args.lora_dropout, torch_compile=args.compile, db=db)
    print(json.dumps({"adapter": result.name, "adapter_dir": str(result.adapter_dir), "metrics": result.metrics},
                     indent=2, default=str))


def cmd_eval_adapter(args: argparse.Namespace) -> None:
    from training.evaluate import evaluate_adapter

    db = _db()
    with _library_output_to_stderr():
        report = evaluate_adapter(Path(args.data), Path(args.adapter), base_model_dir=_resolve_base(args.base),
                                  db=db)
    print(json.dumps(report.to_dict(), indent=2, default=str))
    if not report.passed:
        sys.exit(1)


def cmd_demo(_args: argparse.Namespace) -> None:
    from abloop.console import exit_output_to
    from abloop.demo import DemoConfig, run_demo

    config = DemoConfig()
    run_demo(config)
    exit_output_to(config.log_path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abloop", description="A/B serving proxy and self-improvement loop.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace], None], help_: str, parent=sub):
        command = parent.add_parser(name, help=help_, description=help_)
        command.set_defaults(handler=handler)
        return command

    proxy = add("proxy", cmd_proxy, "Run the A/B serving proxy.")
    proxy.add_argument("--host", default="127.0.0.1")
    proxy.add_argument("--port", type=int, default=8000)
    proxy.add_argument("--workers", type=int, help="processes (default: $WEB_CONCURRENCY, else one per usable core)")
    proxy.add_argument("--log-level", default="info")

    index = sub.add_parser("index", help="Manage the retrieval index.").add_subparsers(dest="action", required=True)
    build = add("build", cmd_index_build, "Build a new index version in INDEX_DIR.", parent=index)
    build.add_argument("--corpus", default="pydoc", help="pydoc | DIR | FILE_OF_URLS (default: pydoc)")
    build.add_argument("--kind", choices=["flat", "hnsw"], default="flat")

    serve = add("serve-model", cmd_serve_model, "Run the embedded OpenAI-compatible model server.")
    add_server_arguments(serve)

    dataset = sub.add_parser("dataset", help="Training data.").add_subparsers(dest="action", required=True)
    ds_build = add("build", cmd_dataset_build, "Build a training dataset from logged traffic.", parent=dataset)
    ds_build.add_argument("--out", required=True)
    ds_build.add_argument("--min-rating", type=int, default=4)
    ds_build.add_argument("--semantic-threshold", type=float, default=0.95)

    train = add("train", cmd_train, "Fine-tune a LoRA adapter.")
    train.add_argument("--data", required=True)
    train.add_argument("--out", required=True)
    train.add_argument("--base", default="default", help="default | HF_DIR")
    train.add_argument("--max-steps", type=int, default=None,
                       help="optimizer steps (default 60 unless --epochs); wins over --epochs when both are given")
    train.add_argument("--epochs", type=float, default=None, help="passes over the training rows, instead of steps")
    train.add_argument("--learning-rate", type=float, default=2e-4)
    train.add_argument("--batch-size", type=int, default=4,
                       help="rows per optimizer step; packed sequences when packing (default 4)")
    train.add_argument("--load-in-4bit", action="store_true", help="CUDA only (bitsandbytes: the `gpu` extra)")
    train.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                       help="pack rows into sequences without padding (default: on CUDA, off on CPU)")
    train.add_argument("--lora-dropout", type=float, default=0.05,
                       help="dropout on the adapters' inputs, in [0, 1) (default 0.05; 0 is faster)")
    train.add_argument("--compile", action="store_true",
                       help="run the model under torch.compile (compiles first; not measured on a GPU yet)")

    ev = add("eval-adapter", cmd_eval_adapter, "Compare an adapter with its base on the holdout (offline gate).")
    ev.add_argument("--data", required=True)
    ev.add_argument("--adapter", required=True)
    ev.add_argument("--base", default="default")

    evaluate = add("evaluate", cmd_evaluate, "Per-arm analysis of an experiment and the decision it supports.")
    evaluate.add_argument("--experiment", help="default: the running experiment")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")

    promote = add("promote", cmd_promote, "Promote the candidate of an experiment to control.")
    promote.add_argument("--experiment", required=True)
    promote.add_argument("--force", action="store_true", help="promote without a recorded promote decision")

    rollback = add("rollback", cmd_rollback, "End an experiment as rolled back: every user is served by control.")
    rollback.add_argument("--experiment", required=True)
    rollback.add_argument("--reason", help="recorded with the transition")

    status = add("status", cmd_status, "The running experiment, its phase, rollout step and every transition.")
    status.add_argument("--experiment", help="default: the running experiment")
    status.add_argument("--json", action="store_true", help="print one JSON object")

    report = add("report", cmd_report, "Write the self-contained HTML operator report of an experiment, or the "
                 "weekly report (--weekly).")
    which = report.add_mutually_exclusive_group()
    which.add_argument("--experiment", help="default: the running experiment, else the last one with a candidate")
    which.add_argument("--weekly", action="store_true", help="week over week per arm (what the weekly_report flow "
                       "writes, without Prefect)")
    report.add_argument("--week-ending", type=date.fromisoformat, metavar="YYYY-MM-DD",
                        help="with --weekly: the last day of the week (default: yesterday, UTC)")
    report.add_argument("--out", default="reports", help="directory (default: reports/)")

    add("migrate", cmd_migrate, "Apply the schema migrations once (replicas do not race to migrate).")
    add("demo", cmd_demo, "Run the whole loop end to end on the embedded defaults.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as error:  # a real error: one line, non-zero, no traceback (-v shows it)
        if args.verbose:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SystemExit(f"abloop {args.command}: error: {message}") from None


def _run(args: argparse.Namespace) -> None:
    from store.logs import configure_logging
    from store.tracing import configure_tracing

    configure_logging(**_logging_options(args))
    configure_tracing(f"abloop-{args.command}")  # exports only when OTEL_EXPORTER_OTLP_ENDPOINT is set
    args.handler(args)


def _logging_options(args: argparse.Namespace) -> dict[str, Any]:
    """LOG_FORMAT, LOG_LEVEL (DEBUG with -v), and every configured secret, kept out of the lines (store.logs)."""
    settings = _settings()
    return {"format": settings.log_format, "level": "DEBUG" if args.verbose else settings.log_level,
            "secrets": settings.secret_values()}


def _log_config(args: argparse.Namespace) -> dict[str, Any]:
    """The same setup for uvicorn (`log_config=`): its own loggers and every worker process log through it."""
    from store.logs import logging_config

    return logging_config(**_logging_options(args))


if __name__ == "__main__":
    main()
