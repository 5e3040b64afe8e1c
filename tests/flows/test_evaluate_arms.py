"""The evaluate_arms flow as a real Prefect run: scores answers, records the decision, publishes artifacts."""

from __future__ import annotations

from store import experiments
from store.db import Database
from store.scores import scores_by_event
from tests.flows.artifacts import artifacts_by_key
from tests.flows.seeded import promotable_experiment


def test_evaluate_arms_records_a_decision_and_acts_on_the_rollout(tmp_path, monkeypatch):
    from flows.evaluate_arms import evaluate_arms

    db, running = promotable_experiment(tmp_path / "flow.db")
    monkeypatch.setenv("DATABASE_URL", db.url)

    state = evaluate_arms(score_sample=5, return_state=True)
    assert state.is_completed()
    analysis = state.result()
    assert analysis["decision"]["action"] == "promote"
    assert analysis["decision"]["rollout"]["did"] == "promoted"
    assert experiments.get(db, running.id).status == "promoted"
    # The test traffic has no answers to score: the scoring task ran and found nothing to do.
    assert scores_by_event(db, running.id, "grounding") == {}
    by_key = artifacts_by_key(state.state_details.flow_run_id)
    assert {"arms", "decision"} <= set(by_key)
    assert "promote" in by_key["decision"].data and "always-valid" in by_key["decision"].data


def test_evaluate_arms_on_an_empty_store_says_not_enough_data(tmp_path, monkeypatch):
    from flows.evaluate_arms import evaluate_arms

    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    Database(f"sqlite:///{tmp_path / 'empty.db'}").migrate()
    analysis = evaluate_arms(score_sample=0)
    assert analysis["experiment_id"] is None and analysis["decision"]["action"] == "not_enough_data"
