"""The evaluate_arms flow as a real Prefect run: scores answers, records the decision, publishes artifacts."""

from __future__ import annotations

import httpx
from prefect.settings import PREFECT_API_URL

from store import experiments
from store.db import Database
from store.scores import scores_by_event
from tests.experiment import traffic
from tests.experiment.traffic import ArmBehaviour


def _artifacts(run_id: str) -> dict[str, dict]:
    # Raw API call: Prefect 3.8.8's client sends nulls in artifact filters, which its server
    # (under the pinned fastapi) rejects with a 422.
    artifacts = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 10, "offset": 0, "sort": "CREATED_DESC",
        "flow_runs": {}, "task_runs": {}}).raise_for_status().json()
    return {a["key"]: a for a in artifacts}


def test_evaluate_arms_records_a_decision_and_acts_on_the_rollout(tmp_path, monkeypatch):
    from experiment import lifecycle
    from flows.evaluate_arms import evaluate_arms

    db = Database(f"sqlite:///{tmp_path / 'flow.db'}")
    db.migrate()
    running = traffic.start(db, share=0.0)
    lifecycle.set_rollout(db, running.id, {"steps": [0.5], "min_users_per_step": 0, "min_hours_per_step": 0})
    running = experiments.get(db, running.id)
    traffic.write(db, running, users=2000, control=ArmBehaviour(up=0.45), candidate=ArmBehaviour(up=0.60))
    monkeypatch.setenv("DATABASE_URL", db.url)

    state = evaluate_arms(score_sample=5, return_state=True)
    assert state.is_completed()
    analysis = state.result()
    assert analysis["decision"]["action"] == "promote"
    assert analysis["decision"]["rollout"]["did"] == "promoted"
    assert experiments.get(db, running.id).status == "promoted"
    # The test traffic has no answers to score: the scoring task ran and found nothing to do.
    assert scores_by_event(db, running.id, "grounding") == {}
    by_key = _artifacts(str(state.state_details.flow_run_id))
    assert {"arms", "decision"} <= set(by_key)
    assert "promote" in by_key["decision"]["data"] and "always-valid" in by_key["decision"]["data"]


def test_evaluate_arms_on_an_empty_store_says_not_enough_data(tmp_path, monkeypatch):
    from flows.evaluate_arms import evaluate_arms

    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    Database(f"sqlite:///{tmp_path / 'empty.db'}").migrate()
    analysis = evaluate_arms(score_sample=0)
    assert analysis["experiment_id"] is None and analysis["decision"]["action"] == "not_enough_data"
