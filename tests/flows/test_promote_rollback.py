"""The promote and rollback flows as real Prefect runs over the same operation as the API and CLI."""

from __future__ import annotations

from store import experiments
from store.db import Database
from tests.experiment import traffic


def _store(tmp_path, monkeypatch) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'flows.db'}")
    db.migrate()
    monkeypatch.setenv("DATABASE_URL", db.url)
    return db


def test_promote_needs_a_recorded_decision_unless_forced(tmp_path, monkeypatch):
    from flows.promote import promote

    db = _store(tmp_path, monkeypatch)
    running = traffic.start(db)
    refused = promote(running.id, return_state=True)
    assert refused.is_failed() and "no recorded promote decision" in str(refused.message)
    assert experiments.get(db, running.id).status == "running"
    outcome = promote(running.id, force=True, reason="the on-call operator approved it")
    ended = experiments.get(db, running.id)
    assert ended.status == "promoted" and ended.decision["via"] == "prefect"
    assert ended.decision["reason"] == "the on-call operator approved it"
    assert experiments.get_running(db).id == outcome["new_experiment"]


def test_rollback_ends_the_experiment_and_refuses_an_ended_one(tmp_path, monkeypatch):
    from flows.rollback import rollback

    db = _store(tmp_path, monkeypatch)
    running = traffic.start(db)
    outcome = rollback(running.id, reason="on-call decision")
    ended = experiments.get(db, running.id)
    assert ended.status == "rolled_back" and ended.decision["via"] == "prefect"
    assert experiments.list_events(db, running.id)[-1].reason == "on-call decision"
    assert experiments.get_running(db).id == outcome["new_experiment"]
    again = rollback(running.id, return_state=True)
    assert again.is_failed() and "rolled_back" in str(again.message)
