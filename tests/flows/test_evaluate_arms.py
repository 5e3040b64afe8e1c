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


def test_the_scoring_settings_reach_the_scoring_task(tmp_path, monkeypatch):
    """ANSWER_SCORE_SAMPLE is the sample when the run names none, 0 skips scoring, and the judge's endpoint, model
    and key and the embedding model go to the task as set."""
    import flows.evaluate_arms
    from flows.evaluate_arms import evaluate_arms

    db, running = promotable_experiment(tmp_path / "flow.db")
    asked: list[tuple] = []
    monkeypatch.setattr(flows.evaluate_arms, "score_answers", lambda *args: asked.append(args) or {})
    for name, value in {"DATABASE_URL": db.url, "ANSWER_SCORE_SAMPLE": "7", "EMBEDDING_MODEL": "/models/embedder",
                        "JUDGE_API_BASE": "http://judge.test/v1", "JUDGE_MODEL": "judge-1",
                        "LLM_API_KEY": "sk-judge"}.items():
        monkeypatch.setenv(name, value)
    evaluate_arms(experiment_id=running.id)
    evaluate_arms(experiment_id=running.id, score_sample=3)  # the run's own sample wins
    monkeypatch.setenv("ANSWER_SCORE_SAMPLE", "0")
    evaluate_arms(experiment_id=running.id)  # scoring off
    assert asked == [
        (db.url, running.id, per_arm, "/models/embedder", "http://judge.test/v1", "judge-1", "sk-judge")
        for per_arm in (7, 3)
    ]
