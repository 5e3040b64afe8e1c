"""`abloop`'s commands called in this process (`abloop.cli.main`): what each prints and how each refuses.

tests/abloop/test_cli.py drives the installed console script in subprocesses, as a user does; these
check the same commands' output and errors exactly, in milliseconds, where a changed line would show.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from abloop import cli
from abloop.cli import main
from experiment import lifecycle
from store import experiments
from store.db import Database
from tests.conftest import POSTGRES_URL, UNDER_TEST_EMBEDDER
from tests.experiment import traffic
from tests.experiment.traffic import ArmBehaviour


@pytest.fixture
def db(tmp_path, monkeypatch) -> Database:
    """An empty store at DATABASE_URL, and an INDEX_DIR with no index, for the commands to find."""
    url = f"sqlite:///{tmp_path / 'abloop.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("INDEX_DIR", str(tmp_path / "index"))
    database = Database(url)
    database.migrate()
    return database


def _one_line_exit(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = str(exit_.value.code)
    assert "\n" not in message
    return message


def test_migrate_prints_the_database_without_its_password(monkeypatch, capsys):
    with_password = POSTGRES_URL.replace("postgres@", "postgres:s3cret-pw@", 1)
    assert "s3cret-pw" in with_password  # trust auth: the password is not needed, only hidden
    monkeypatch.setenv("DATABASE_URL", with_password)
    main(["migrate"])
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"database", "migrated"} and printed["migrated"] is True
    assert "s3cret-pw" not in printed["database"] and "postgres:***@127.0.0.1" in printed["database"]


def test_status_with_and_without_json(db, capsys):
    main(["status", "--json"])
    empty = json.loads(capsys.readouterr().out)
    assert (empty["experiment"], empty["index_version"], empty["search_events"]) == (None, None, 0)
    main(["status"])
    assert capsys.readouterr().out.splitlines()[-1] == "no running experiment"

    running = traffic.start(db)
    traffic.write(db, running, users=40)
    main(["status", "--json"])
    described = json.loads(capsys.readouterr().out)
    assert described["experiment"]["id"] == running.id and described["search_events"] > 0
    main(["status", "--experiment", running.id])
    shown = capsys.readouterr().out
    assert f"experiment {running.id} (running)" in shown and "index: None" in shown
    lifecycle.rollback(db, running.id, via="test")
    main(["status", "--experiment", running.id, "--json"])
    assert json.loads(capsys.readouterr().out)["experiment"]["status"] == "rolled_back"  # not the running one


def test_evaluate_prints_the_analysis_for_a_person_or_as_json(db, capsys, monkeypatch):
    running = traffic.start(db)
    traffic.write(db, running, users=600, control=ArmBehaviour(up=0.3), candidate=ArmBehaviour(up=0.7))
    main(["evaluate", "--experiment", running.id, "--json"])
    analysis = json.loads(capsys.readouterr().out)
    assert analysis["decision"]["action"] == "promote"
    main(["evaluate"])
    shown = capsys.readouterr().out
    assert running.id in shown and "promote" in shown and not shown.lstrip().startswith("{")
    monkeypatch.setenv("EXPERIMENT_MIN_USERS_PER_ARM", "1000")  # the decision rule comes from the settings
    main(["evaluate", "--json"])
    assert json.loads(capsys.readouterr().out)["decision"]["action"] == "not_enough_data"


def test_promote_and_rollback_print_the_successor_or_refuse_in_one_line(db, capsys):
    running = traffic.start(db)  # a candidate at http://candidate.test/v1, no decision recorded yet
    refused = _one_line_exit(["promote", "--experiment", running.id])
    assert refused.startswith("not promoted: ") and "abloop evaluate" in refused
    main(["promote", "--experiment", running.id, "--force"])
    promoted = json.loads(capsys.readouterr().out)
    successor = experiments.get_running(db)
    assert promoted == {"promoted": running.id, "new_experiment": successor.id,
                        "control": {"base_url": "http://candidate.test/v1", "model": successor.control_model}}
    assert experiments.get(db, running.id).decision["via"] == "cli"

    again = lifecycle.start_candidate(db, base_url="http://candidate-3.test/v1", model="candidate-v3", share=0.5)
    main(["rollback", "--experiment", again.id, "--reason", "on call"])
    rolled = json.loads(capsys.readouterr().out)
    assert rolled["rolled_back"] == again.id and rolled["control"]["base_url"] == "http://candidate.test/v1"
    assert experiments.get(db, again.id).decision["reason"] == "on call"
    assert _one_line_exit(["rollback", "--experiment", "nope"]) == "not rolled back: unknown experiment 'nope'"


def test_train_passes_every_option_on_and_prints_the_adapter(db, tmp_path, monkeypatch, capsys):
    import training.train
    from training.train import TrainResult

    asked: dict = {}

    def train_lora(data_dir, out_root, **options):
        asked.update(options, data_dir=data_dir, out_root=out_root)
        return TrainResult(adapter_dir=out_root / "base-abc", name="base-abc", metrics={"tokens_per_s": 1.5},
                           adapter_id="id-1")

    monkeypatch.setattr(training.train, "train_lora", train_lora)
    (tmp_path / "config.json").write_text("{}")  # what makes --base a model directory
    main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "adapters"), "--base", str(tmp_path),
          "--max-steps", "3", "--epochs", "2", "--learning-rate", "0.001", "--batch-size", "6", "--load-in-4bit",
          "--no-packing", "--lora-dropout", "0", "--compile"])
    printed = capsys.readouterr().out
    assert json.loads(printed) == {"adapter": "base-abc", "adapter_dir": str(tmp_path / "adapters" / "base-abc"),
                                   "metrics": {"tokens_per_s": 1.5}}
    assert printed.startswith('{\n  "adapter"')  # indented for a person; jq reads it all the same
    db_given = asked.pop("db")
    assert isinstance(db_given, Database) and db_given.url == db.url
    assert asked == {"data_dir": tmp_path / "data", "out_root": tmp_path / "adapters", "base_model_dir": tmp_path,
                     "max_steps": 3, "epochs": 2.0, "learning_rate": 0.001, "batch_size": 6, "load_in_4bit": True,
                     "packing": False, "lora_dropout": 0.0, "torch_compile": True}


def test_serve_model_passes_every_option_on(monkeypatch):
    import logging

    import serving.server
    from store.logs import TextFormatter

    built: list[dict] = []
    served: list[dict] = []
    monkeypatch.setattr(serving.server, "create_app", lambda **options: built.append(options) or "the app")
    monkeypatch.setattr(serving.server.uvicorn, "run", lambda app, **options: served.append({**options, "app": app}))
    monkeypatch.setenv("LOG_FORMAT", "text")  # not json: "auto" is json here, stderr being no terminal
    monkeypatch.setenv("LOG_LEVEL", "ERROR")  # --log-level wins over it
    root = logging.getLogger()
    try:
        main(["serve-model", "--model", "/models/base", "--host", "0.0.0.0", "--port", "9123", "--adapter", "a=/ad/a",
              "--adapter", "b=/ad/b", "--max-batch", "3", "--max-queue", "9", "--dtype", "float32",
              "--quantize", "none", "--compile", "--log-level", "debug"])
        assert root.level == logging.DEBUG and isinstance(root.handlers[-1].formatter, TextFormatter)
        main(["serve-model"])  # every default, and LOG_LEVEL
        assert root.level == logging.ERROR
    finally:
        logging.captureWarnings(False)  # the server routes warnings to its log for its life; this test's ends here
    assert built == [
        {"model": "/models/base", "adapters": {"a": "/ad/a", "b": "/ad/b"}, "max_batch": 3, "max_queue": 9,
         "dtype": "float32", "quantize": "none", "compile": True},
        {"model": "default", "adapters": {}, "max_batch": 16, "max_queue": 256, "dtype": "auto", "quantize": "none",
         "compile": False},
    ]
    log_configs = [options.pop("log_config") for options in served]
    assert served == [{"app": "the app", "host": host, "port": port, "log_level": level, "timeout_graceful_shutdown": 5}
                      for host, port, level in [("0.0.0.0", 9123, "debug"), ("127.0.0.1", 8001, "error")]]
    assert [(c["root"]["level"], c["handlers"]["default"]["format"]) for c in log_configs] == [
        ("DEBUG", "text"), ("ERROR", "text")]


def test_index_build_embeds_with_embedding_model_and_labels_with_the_metadata_endpoint(db, tmp_path, capsys,
                                                                                       monkeypatch, embedder_asked):
    from retrieval.index import IndexStore
    from serving.stub import running_stub

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "lists.md").write_text("# Lists\n\nA list is a mutable sequence; append adds an item.")
    main(["index", "build", "--corpus", str(corpus), "--kind", "hnsw"])
    plain = json.loads(capsys.readouterr().out)
    labels = {"title": "Lists", "tags": ["python"], "category": "programming"}
    with running_stub(answer=json.dumps(labels)) as (stub, url):
        for name, value in {"METADATA_API_BASE": url, "METADATA_MODEL": "labeller", "LLM_API_KEY": "sk-l"}.items():
            monkeypatch.setenv(name, value)
        main(["index", "build", "--corpus", str(corpus)])
        labelled = json.loads(capsys.readouterr().out)
        stub.delay_s, asked = 1.0, list(stub.recent)
        monkeypatch.setenv("LLM_TIMEOUT_S", "0.2")
        main(["index", "build", "--corpus", str(corpus)])  # the labeller too slow: indexed without labels
    assert json.loads(capsys.readouterr().out)["metadata"] == {"ok": 0, "invalid": 0, "error": 1}

    assert embedder_asked == [UNDER_TEST_EMBEDDER] * 3
    assert plain == {"index_dir": str(tmp_path / "index"), "index_version": plain["index_version"],
                     "documents": 1, "chunks": 1, "kind": "hnsw", "metadata": "off"}
    assert labelled["kind"] == "flat" and labelled["metadata"] == {"ok": 1, "invalid": 0, "error": 0}
    assert [(r.authorization, r.json()["model"]) for r in asked] == [("Bearer sk-l", "labeller")]
    labelled_index = IndexStore(tmp_path / "index").load(labelled["index_version"])
    assert [(c.title, c.tags, c.category) for c in labelled_index.chunks] == [("Lists", ("python",), "programming")]


def test_report_prints_where_it_wrote_the_page(db, tmp_path, capsys):
    earlier = traffic.start(db)
    traffic.write(db, earlier, users=60)
    later = lifecycle.start_candidate(db, base_url="http://candidate-2.test/v1", model="candidate-v2", share=0.5)
    main(["report", "--experiment", earlier.id, "--out", str(tmp_path / "reports")])  # not the running one
    written = Path(json.loads(capsys.readouterr().out)["report"])
    page = written.read_text()
    assert written.parent == tmp_path / "reports" and earlier.id in page and later.id not in page


def test_an_error_is_one_line_naming_the_command_and_verbose_shows_it_whole(db, monkeypatch):
    def fail(_args):
        raise RuntimeError("the store said no\nand a second line")

    monkeypatch.setattr(cli, "cmd_status", fail)
    assert _one_line_exit(["status"]) == "abloop status: error: the store said no"
    with pytest.raises(RuntimeError, match="the store said no"):
        main(["-v", "status"])
    monkeypatch.setattr(cli, "cmd_status", lambda _args: (_ for _ in ()).throw(ValueError()))
    assert _one_line_exit(["status"]) == "abloop status: error: ValueError"  # no message: the error's name
    monkeypatch.setattr(cli, "cmd_status", lambda _args: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as interrupted:
        main(["status"])
    assert interrupted.value.code == 130


@pytest.mark.parametrize(("argv", "level"), [(["status"], "WARNING"), (["-v", "status"], "DEBUG")])
def test_every_command_logs_at_log_level_and_verbose_is_debug(db, monkeypatch, argv, level):
    import logging

    from store.logs import TextFormatter

    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    monkeypatch.setenv("LOG_FORMAT", "text")  # not json: "auto" is json here, stderr being no terminal
    main(argv)
    root = logging.getLogger()
    assert logging.getLevelName(root.level) == level and isinstance(root.handlers[-1].formatter, TextFormatter)


def test_proxy_refuses_fewer_than_one_worker_and_a_wrong_web_concurrency(monkeypatch):
    assert _one_line_exit(["proxy", "--workers", "0"]) == "abloop proxy: --workers must be at least 1"
    monkeypatch.setenv("WEB_CONCURRENCY", "two")
    assert _one_line_exit(["proxy"]) == "abloop proxy: WEB_CONCURRENCY must be a whole number, not 'two'"
    assert os.environ["WEB_CONCURRENCY"] == "two"  # nothing was started, nothing exported


def test_the_workers_metrics_directory_is_emptied_of_an_earlier_servers_files(tmp_path, monkeypatch):
    given = tmp_path / "metrics"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"old")
    (given / "notes.txt").write_text("kept")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(given))
    assert cli._metrics_dir() == str(given)
    assert sorted(p.name for p in given.iterdir()) == ["notes.txt"]
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    fresh = Path(cli._metrics_dir())
    assert fresh.is_dir() and fresh.name.startswith("abloop-metrics-") and not any(fresh.iterdir())
