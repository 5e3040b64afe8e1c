"""Per-arm analysis and decisions on events written the way the proxy writes them."""

from __future__ import annotations

import json
import random

import pytest

from flows.cli import main
from store import experiments
from store.arms import Policy, analyse, record_decision, sample_ratio_check, two_proportions
from store.config import Settings
from store.db import Database
from store.models import Feedback, SearchEvent, new_id, utcnow


@pytest.fixture
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'arms.db'}")
    database.migrate()
    return database


def _experiment(db: Database, share: float = 0.5):
    experiments.ensure_running(db, Settings(database_url=db.url, llm_api_base_new_model="http://c/v1",
                                            candidate_share=share))
    return experiments.get_running(db)


def _traffic(db, experiment, *, users, share, up_rate, error_rate=None, seed=0, latency=None):
    """Test traffic: `users` per arm split by `share`; thumbs up with the arm's rate."""
    rng = random.Random(seed)
    error_rate = error_rate or {"control": 0.0, "candidate": 0.0}
    latency = latency or {"control": 100.0, "candidate": 100.0}
    with db.session() as session:
        for n in range(users):
            arm = "candidate" if rng.random() < share else "control"
            event_id = new_id()
            failed = rng.random() < error_rate[arm]
            session.add(SearchEvent(
                id=event_id, ts=utcnow(), user_id=f"test-user-{n}", experiment_id=experiment.id, arm=arm,
                served_arm=None if failed else arm, query="q", status="error" if failed else "ok",
                timings={"total": latency[arm] * (0.5 + rng.random())}, tokens_in=10, tokens_out=5,
            ))
            session.flush()
            session.add(Feedback(id=new_id(), event_id=event_id, ts=utcnow(),
                                 thumbs="up" if rng.random() < up_rate[arm] else "down"))


def test_clear_winner_is_promoted_and_the_decision_unlocks_promote(db):
    experiment = _experiment(db)
    _traffic(db, experiment, users=2000, share=0.5, up_rate={"control": 0.50, "candidate": 0.62})
    analysis = analyse(db, experiment.id)
    assert analysis.decision["action"] == "promote", analysis.decision
    assert analysis.thumbs_up["chance_to_win"] > 0.99 and analysis.thumbs_up["p_value"] < 0.001
    low, high = analysis.thumbs_up["ci"]
    assert low < 0.12 < high
    assert analysis.arms["control"]["requests"] + analysis.arms["candidate"]["requests"] == 2000
    record_decision(db, analysis)
    assert experiments.get(db, experiment.id).decision["action"] == "promote"


def test_no_difference_keeps_running_and_little_data_says_so(db):
    experiment = _experiment(db)
    _traffic(db, experiment, users=60, share=0.5, up_rate={"control": 0.5, "candidate": 0.5})
    assert analyse(db, experiment.id).decision["action"] == "not_enough_data"
    _traffic(db, experiment, users=3000, share=0.5, up_rate={"control": 0.5, "candidate": 0.5}, seed=1)
    assert analyse(db, experiment.id).decision["action"] in {"keep_running"}


def test_sample_ratio_mismatch_blocks_any_verdict(db):
    experiment = _experiment(db, share=0.5)
    # Traffic split 70/30 while the experiment says 50/50: assignment is broken.
    _traffic(db, experiment, users=2000, share=0.3, up_rate={"control": 0.4, "candidate": 0.7})
    analysis = analyse(db, experiment.id)
    assert analysis.srm["mismatch"] and analysis.srm["p_value"] < 0.001
    assert analysis.decision["action"] == "keep_running" and "sample ratio" in analysis.decision["reason"]


def test_guardrails_roll_back_a_failing_or_slow_candidate(db):
    experiment = _experiment(db)
    _traffic(db, experiment, users=1000, share=0.5, up_rate={"control": 0.5, "candidate": 0.6},
             error_rate={"control": 0.0, "candidate": 0.1})
    analysis = analyse(db, experiment.id, Policy())
    assert analysis.decision["action"] == "roll_back" and "error rate" in analysis.guardrails["breached"]


def test_statistics_against_known_values():
    assert sample_ratio_check(500, 500, 0.5)["p_value"] == pytest.approx(1.0)
    assert sample_ratio_check(5050, 4950, 0.5)["p_value"] == pytest.approx(0.3173, abs=1e-3)
    result = two_proportions(100, 1000, 130, 1000, 0.05)
    assert result["lift"] == pytest.approx(0.03)
    assert result["p_value"] == pytest.approx(0.0355, abs=1e-3)  # pooled z = 2.10


def test_abloop_evaluate_json(db, monkeypatch, capsys):
    experiment = _experiment(db)
    _traffic(db, experiment, users=300, share=0.5, up_rate={"control": 0.5, "candidate": 0.5})
    monkeypatch.setenv("DATABASE_URL", db.url)
    main(["evaluate", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["experiment_id"] == experiment.id
    assert set(printed["arms"]) == {"control", "candidate"} and printed["decision"]["action"]
