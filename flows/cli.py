"""The `abloop` command. Each subcommand imports what it needs when it runs, so `--help` is instant."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

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


def cmd_proxy(args: argparse.Namespace) -> None:
    import uvicorn

    uvicorn.run("proxy.app:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=args.log_level, access_log=False)


def cmd_index_build(args: argparse.Namespace) -> None:
    from retrieval.build import build_index
    from retrieval.corpus import load_corpus
    from retrieval.embedder import Embedder
    from retrieval.index import IndexStore

    settings = _settings()
    documents = load_corpus(args.corpus)
    index = build_index(documents, Embedder(settings.embedding_model), IndexStore(settings.index_dir), kind=args.kind)
    print(json.dumps({"index_dir": str(settings.index_dir), "index_version": index.version,
                      "documents": len(documents), "chunks": len(index), "kind": index.kind}))


def cmd_serve_model(args: argparse.Namespace) -> None:
    from serving.server import parse_adapter_args, run

    try:
        adapters = parse_adapter_args(args.adapter)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    run(model=args.model, host=args.host, port=args.port, adapters=adapters)


def cmd_status(_args: argparse.Namespace) -> None:
    from retrieval.index import IndexStore
    from store import experiments
    from store.events import count_events, count_feedback

    settings = _settings()
    db = _db()
    running = experiments.get_running(db)
    print(json.dumps({
        "database": db.engine.url.render_as_string(hide_password=True),
        "index_version": IndexStore(settings.index_dir).current_version(),
        "experiment": None if running is None else {
            "id": running.id,
            "control": {"base_url": running.control_base_url, "model": running.control_model},
            "candidate": None if not running.candidate_base_url
            else {"base_url": running.candidate_base_url, "model": running.candidate_model},
            "candidate_share": running.candidate_share,
            "started_at": running.started_at.isoformat(),
        },
        "search_events": count_events(db),
        "feedback": count_feedback(db),
    }, indent=2))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from store.arms import evaluate

    try:
        analysis = evaluate(_db(), args.experiment)
    except LookupError as error:
        raise SystemExit(str(error)) from None
    if args.json:
        print(json.dumps(analysis.to_dict(), default=str))
        return
    print(f"experiment {analysis.experiment_id} (candidate share {analysis.candidate_share:.0%})")
    for name in ("users", "requests", "thumbs_up_rate", "mean_rating", "correction_rate", "error_rate",
                 "fallback_rate", "latency_p50_ms", "latency_p95_ms", "tokens_out"):
        values = [analysis.arms[arm][name] for arm in ("control", "candidate")]
        print(f"  {name:<16} " + "  ".join(f"{v:>12.4g}" if isinstance(v, float) else f"{v!s:>12}" for v in values))
    print(f"decision: {analysis.decision['action']} - {analysis.decision['reason']}")


def cmd_promote(args: argparse.Namespace) -> None:
    from store import experiments

    try:
        fresh = experiments.promote(_db(), args.experiment, force=args.force, via="cli")
    except (experiments.ExperimentNotFound, experiments.NoPromoteDecision, experiments.ExperimentNotRunning) as error:
        raise SystemExit(f"not promoted: {error}") from None
    print(json.dumps({"promoted": args.experiment, "new_experiment": fresh.id,
                      "control": {"base_url": fresh.control_base_url, "model": fresh.control_model}}))


def _resolve_base(base: str) -> Path:
    from serving.model import resolve_base_model

    return resolve_base_model(base)


def cmd_dataset_build(args: argparse.Namespace) -> None:
    from training.dataset import build_dataset

    db = _db()
    card = build_dataset(db, Path(args.out), min_rating=args.min_rating,
                         semantic_threshold=args.semantic_threshold)
    print(json.dumps(card.to_dict(), indent=2, default=str))


def cmd_train(args: argparse.Namespace) -> None:
    from training.train import train_lora

    db = _db()
    result = train_lora(Path(args.data), Path(args.out), base_model_dir=_resolve_base(args.base),
                        max_steps=args.max_steps, learning_rate=args.learning_rate,
                        load_in_4bit=args.load_in_4bit, db=db)
    print(json.dumps({"adapter": result.name, "adapter_dir": str(result.adapter_dir), "metrics": result.metrics},
                     indent=2, default=str))


def cmd_eval_adapter(args: argparse.Namespace) -> None:
    from training.evaluate import evaluate_adapter

    db = _db()
    report = evaluate_adapter(Path(args.data), Path(args.adapter), base_model_dir=_resolve_base(args.base), db=db)
    print(json.dumps(report.to_dict(), indent=2, default=str))
    if not report.passed:
        sys.exit(1)


def cmd_demo(_args: argparse.Namespace) -> None:
    from flows.demo import run_demo

    run_demo()


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
    proxy.add_argument("--workers", type=int, default=1)
    proxy.add_argument("--log-level", default="info")

    index = sub.add_parser("index", help="Manage the retrieval index.").add_subparsers(dest="action", required=True)
    build = add("build", cmd_index_build, "Build a new index version in INDEX_DIR.", parent=index)
    build.add_argument("--corpus", default="pydoc", help="pydoc | DIR | FILE_OF_URLS (default: pydoc)")
    build.add_argument("--kind", choices=["flat", "hnsw"], default="flat")

    serve = add("serve-model", cmd_serve_model, "Run the embedded OpenAI-compatible model server.")
    serve.add_argument("--model", default="default", help="default | HF_DIR")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8001)
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")

    dataset = sub.add_parser("dataset", help="Training data.").add_subparsers(dest="action", required=True)
    ds_build = add("build", cmd_dataset_build, "Build a training dataset from logged traffic.", parent=dataset)
    ds_build.add_argument("--out", required=True)
    ds_build.add_argument("--min-rating", type=int, default=4)
    ds_build.add_argument("--semantic-threshold", type=float, default=0.95)

    train = add("train", cmd_train, "Fine-tune a LoRA adapter.")
    train.add_argument("--data", required=True)
    train.add_argument("--out", required=True)
    train.add_argument("--base", default="default", help="default | HF_DIR")
    train.add_argument("--max-steps", type=int, default=60)
    train.add_argument("--learning-rate", type=float, default=2e-4)
    train.add_argument("--load-in-4bit", action="store_true", help="CUDA only (bitsandbytes)")

    ev = add("eval-adapter", cmd_eval_adapter, "Compare an adapter with its base on the holdout (offline gate).")
    ev.add_argument("--data", required=True)
    ev.add_argument("--adapter", required=True)
    ev.add_argument("--base", default="default")

    evaluate = add("evaluate", cmd_evaluate, "Per-arm analysis of an experiment and the decision it supports.")
    evaluate.add_argument("--experiment", help="default: the running experiment")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")

    promote = add("promote", cmd_promote, "Promote the candidate of an experiment to control.")
    promote.add_argument("--experiment", required=True)
    promote.add_argument("--force", action="store_true")

    add("status", cmd_status, "Show the running experiment, index and counts.")
    add("demo", cmd_demo, "Run the whole loop end to end on the embedded defaults.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Migrations run on every start and httpx logs every upstream call: noise, and on the
    # request path a measurable cost (bench/proxy_overhead.py).
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for chatty in ("httpx", "faiss.loader", "sentence_transformers"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    args.handler(args)


if __name__ == "__main__":
    main()
