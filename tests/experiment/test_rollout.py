"""The rollout acting on evaluations: advance when safe, roll back on a loss, promote at the end."""

from __future__ import annotations

import experiment
from experiment import lifecycle
from experiment.status import describe, render
from store import experiments
from tests.experiment import traffic
from tests.experiment.traffic import ArmBehaviour

PLAN = {"steps": [0.1, 0.5], "min_users_per_step": 300, "min_hours_per_step": 0}


def _step(db, experiment_id, users, first_user, control=traffic.SAME, candidate=traffic.SAME, seed=0):
    current = experiments.get(db, experiment_id)
    traffic.write(db, current, users=users, first_user=first_user, control=control, candidate=candidate, seed=seed)
    return experiment.evaluate(db, experiment_id)


def test_an_aa_rollout_advances_but_never_promotes_or_rolls_back(sqlite_db):
    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, PLAN)
    first = _step(sqlite_db, running.id, 200, 0)
    assert first.decision["rollout"]["did"] == "wait"  # 200 users < 300 for the step, and too few per arm
    assert experiments.get(sqlite_db, running.id).candidate_share == 0.1
    second = _step(sqlite_db, running.id, 1800, 200, seed=1)
    assert second.action == "keep_running", second.decision
    assert second.decision["rollout"] == {"did": "advanced", "step": 1, "share": 0.5}
    assert experiments.get(sqlite_db, running.id).candidate_share == 0.5
    for n in range(3):
        later = _step(sqlite_db, running.id, 1000, 2000 + 1000 * n, seed=2 + n)
        assert later.action in ("keep_running", "not_enough_data"), later.decision
        assert later.decision["rollout"]["did"] == "wait"
    assert not later.srm["mismatch"] and [p["share"] for p in later.phases] == [0.0, 0.1, 0.5]
    assert experiments.get(sqlite_db, running.id).status == "running"


def test_a_better_candidate_is_promoted_at_the_last_step(db):
    """On SQLite and on PostgreSQL: analysis, record_decision and the promotion through the real store."""
    running = traffic.start(db, share=0.0)
    lifecycle.set_rollout(db, running.id, PLAN)
    better = ArmBehaviour(up=0.75)
    advanced = _step(db, running.id, 2000, 0, candidate=better)
    assert advanced.decision["rollout"]["did"] == "advanced"
    final = _step(db, running.id, 2000, 2000, candidate=better, seed=1)
    assert final.action == "promote" and final.decision["rollout"]["did"] == "promoted"
    assert experiments.get(db, running.id).status == "promoted"
    successor = experiments.get_running(db)
    assert successor.control_base_url == "http://candidate.test/v1" and successor.candidate_share == 0.0
    status = describe(db, running.id)
    kinds = [t["kind"] for t in status["experiment"]["transitions"]]
    assert kinds == ["start", "rollout_step", "rollout_step", "promoted"]
    assert "automatic" in status["experiment"]["transitions"][-1]["reason"]
    assert "promoted" in render(status)


def test_promotion_waits_for_approval_when_asked(sqlite_db):
    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, dict(PLAN, auto_promote=False))
    better = ArmBehaviour(up=0.75)
    _step(sqlite_db, running.id, 2000, 0, candidate=better)
    final = _step(sqlite_db, running.id, 2000, 2000, candidate=better, seed=1)
    assert final.action == "promote" and final.decision["rollout"]["did"] == "awaiting_approval"
    assert experiments.get(sqlite_db, running.id).status == "running"
    lifecycle.promote(sqlite_db, running.id, via="operator")  # the recorded decision allows it
    assert experiments.get(sqlite_db, running.id).status == "promoted"


def test_a_worse_candidate_is_rolled_back_automatically(sqlite_db):
    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, {"steps": [0.5], "min_users_per_step": 0, "min_hours_per_step": 0})
    worse = _step(sqlite_db, running.id, 1500, 0, candidate=ArmBehaviour(up=0.3), control=ArmBehaviour(up=0.5))
    assert worse.action == "roll_back" and worse.decision["rollout"]["did"] == "rolled_back"
    ended = experiments.get(sqlite_db, running.id)
    assert ended.status == "rolled_back" and ended.decision["via"] == "rollout"
    [*_, rolled] = experiments.list_events(sqlite_db, running.id)
    assert rolled.kind == "rolled_back" and rolled.analysis["decision"]["action"] == "roll_back"
    assert experiments.get_running(sqlite_db).candidate_base_url is None
