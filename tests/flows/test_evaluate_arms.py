"""The evaluate_arms flow as a real Prefect run: records the decision and publishes artifacts."""

from __future__ import annotations

import httpx
from prefect.settings import PREFECT_API_URL

from store import experiments
from store.db import Database
from tests.store.test_arms import _experiment, _traffic


def test_evaluate_arms_records_a_decision(tmp_path, monkeypatch):
    from flows.evaluate_arms import evaluate_arms

    db = Database(f"sqlite:///{tmp_path / 'flow.db'}")
    db.migrate()
    experiment = _experiment(db)
    _traffic(db, experiment, users=2000, share=0.5, up_rate={"control": 0.45, "candidate": 0.60})
    monkeypatch.setenv("DATABASE_URL", db.url)

    state = evaluate_arms(return_state=True)
    assert state.is_completed()
    assert state.result()["decision"]["action"] == "promote"
    assert experiments.get(db, experiment.id).decision["action"] == "promote"
    run_id = str(state.state_details.flow_run_id)
    # Raw API call: Prefect 3.8.8's client sends nulls in artifact filters, which its server
    # (under fastapi 0.154) rejects with a 422.
    artifacts = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 10, "offset": 0, "sort": "CREATED_DESC",
        "flow_runs": {}, "task_runs": {}}).raise_for_status().json()
    by_key = {a["key"]: a for a in artifacts}
    assert {"arms", "decision"} <= set(by_key)
    assert "promote" in by_key["decision"]["data"]
