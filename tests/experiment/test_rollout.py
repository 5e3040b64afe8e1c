"""The rollout acting on evaluations: advance when safe, roll back on a loss, promote at the end."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

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
        assert later.decision["rollout"]["step_users"] == 1000 * (n + 1)  # the users of the current step only
    assert not later.srm["mismatch"] and [p["share"] for p in later.phases] == [0.0, 0.1, 0.5]
    assert experiments.get(sqlite_db, running.id).status == "running"


def test_a_broken_split_holds_the_step_and_a_breach_behind_it_rolls_back(sqlite_db):
    """Users bucketed at 30% while the plan says 10%: the step must not advance on a split it cannot trust,
    and a guardrail the candidate breaches meanwhile must not hide behind the mismatch."""
    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, PLAN)
    current = experiments.get(sqlite_db, running.id)
    traffic.write(sqlite_db, current, users=3000, share=0.3)
    held = experiment.evaluate(sqlite_db, running.id)
    assert held.srm["mismatch"] and held.action == "keep_running", held.decision
    assert held.decision["rollout"]["did"] == "wait"
    assert experiments.get(sqlite_db, running.id).candidate_share == 0.1

    traffic.write(sqlite_db, current, users=3000, first_user=3000, share=0.3, candidate=ArmBehaviour(error=0.3),
                  seed=1)
    failing = experiment.evaluate(sqlite_db, running.id)
    assert failing.srm["mismatch"] and failing.action == "roll_back", failing.decision
    assert failing.decision["reason"].startswith("guardrail breached: error_rate")
    assert failing.decision["rollout"]["did"] == "rolled_back"
    assert experiments.get(sqlite_db, running.id).status == "rolled_back"


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
    assert experiments.get(db, running.id).decision["via"] == "rollout"
    successor = experiments.get_running(db)
    assert successor.control_base_url == "http://candidate.test/v1" and successor.candidate_share == 0.0
    status = describe(db, running.id)
    kinds = [t["kind"] for t in status["experiment"]["transitions"]]
    assert kinds == ["start", "rollout_step", "rollout_step", "promoted"]
    assert final.decision["rollout"] == {"did": "promoted", "step": 1, "successor": successor.id}
    assert "automatic" in status["experiment"]["transitions"][-1]["reason"]
    assert "promoted" in render(status)


def test_promotion_waits_for_approval_when_asked(sqlite_db):
    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, dict(PLAN, auto_promote=False))
    better = ArmBehaviour(up=0.75)
    _step(sqlite_db, running.id, 2000, 0, candidate=better)
    final = _step(sqlite_db, running.id, 2000, 2000, candidate=better, seed=1)
    assert final.action == "promote" and final.decision["rollout"]["did"] == "awaiting_approval"
    assert final.decision["rollout"]["step"] == 1 and final.decision["rollout"]["step_users"] >= 2000
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


def test_a_rollback_says_why_and_names_the_experiment_that_serves_next(sqlite_db):
    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, {"steps": [0.5], "min_users_per_step": 0, "min_hours_per_step": 0})
    worse = _step(sqlite_db, running.id, 1500, 0, candidate=ArmBehaviour(up=0.3), control=ArmBehaviour(up=0.5))
    successor = experiments.get_running(sqlite_db)
    assert worse.decision["rollout"] == {"did": "rolled_back", "step": 0, "successor": successor.id}
    [*_, rolled] = experiments.list_events(sqlite_db, running.id)
    assert rolled.reason == f"automatic: {worse.decision['reason']}"
    assert experiments.get(sqlite_db, running.id).decision["action"] == "roll_back"


def test_each_step_advances_to_the_next_share_of_the_plan(sqlite_db):
    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, {"steps": [0.1, 0.3, 0.5], "min_users_per_step": 2000,
                                                  "min_hours_per_step": 0})
    first = _step(sqlite_db, running.id, 2000, 0)  # exactly the step's minimum of users
    assert first.decision["rollout"] == {"did": "advanced", "step": 1, "share": 0.3}
    assert experiments.get(sqlite_db, running.id).candidate_share == 0.3
    assert experiments.get(sqlite_db, running.id).rollout["step"] == 1
    [*_, step] = experiments.list_events(sqlite_db, running.id)
    assert step.kind == "rollout_step" and step.to_share == 0.3 and step.analysis["experiment_id"] == running.id
    assert step.reason.startswith("step 2 of 3 (30%): step 1 had ")


def test_a_step_counts_the_users_it_served_returning_ones_too(sqlite_db):
    """A closed population: step 2 sees no new user, only the 2,000 of step 1 coming back. They are its
    exposure (the split check counts new users only, and a step counting only those would never advance)."""
    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, {"steps": [0.1, 0.3, 0.5], "min_users_per_step": 2000,
                                                  "min_hours_per_step": 0})
    assert _step(sqlite_db, running.id, 2000, 0).decision["rollout"]["did"] == "advanced"
    again = _step(sqlite_db, running.id, 2000, 0, seed=1)  # the same users, at 30% now
    assert again.phases[-1]["users"] == [0, 0] and again.phases[-1]["active_users"] == 2000
    assert again.decision["rollout"] == {"did": "advanced", "step": 2, "share": 0.5}, again.decision


def test_a_step_waits_for_its_hours_as_well_as_its_users(sqlite_db, monkeypatch):
    from experiment import rollout

    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, dict(PLAN, min_hours_per_step=2.0))
    early = _step(sqlite_db, running.id, 2000, 0)
    waiting = early.decision["rollout"]
    assert waiting["did"] == "wait" and waiting["step"] == 0 and waiting["step_users"] >= 2000
    assert 0 <= waiting["step_hours"] < 0.1
    step_started = datetime.fromisoformat(early.phases[-1]["start"])
    monkeypatch.setattr(rollout, "utcnow", lambda: step_started + timedelta(seconds=4321))
    waiting = experiment.evaluate(sqlite_db, running.id).decision["rollout"]
    assert waiting["did"] == "wait" and waiting["step_hours"] == 1.2  # 1.2003 h, rounded for the output
    monkeypatch.setattr(rollout, "utcnow", lambda: step_started + timedelta(hours=2))  # exactly the minimum
    later = experiment.evaluate(sqlite_db, running.id).decision["rollout"]
    assert later == {"did": "advanced", "step": 1, "share": 0.5}


def test_a_step_with_its_users_but_no_verdict_yet_waits(sqlite_db):
    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, dict(PLAN, min_users_per_step=50))
    few = _step(sqlite_db, running.id, 80, 0)  # 80 users in the step, but too few per arm for any verdict
    assert few.action == "not_enough_data"
    assert few.decision["rollout"]["did"] == "wait" and few.decision["rollout"]["step_users"] >= 50
    assert experiments.get(sqlite_db, running.id).candidate_share == 0.1


def test_the_policy_given_to_evaluate_is_the_one_applied(sqlite_db):
    from experiment.decision import Policy

    running = traffic.start(sqlite_db, share=0.5)
    traffic.write(sqlite_db, running, users=400, first_user=0, control=traffic.SAME, candidate=traffic.SAME, seed=0)
    strict = experiment.evaluate(sqlite_db, running.id, Policy(min_users_per_arm=10_000))
    assert strict.action == "not_enough_data" and "need 10000 in each" in strict.decision["reason"]
    assert experiments.get(sqlite_db, running.id).decision["evaluated_at"] == strict.evaluated_at


def test_a_plan_takes_its_defaults_and_round_trips():
    from experiment.rollout import RolloutPlan

    plan = RolloutPlan.from_dict({"steps": [0.1, 1]})
    assert plan == RolloutPlan(steps=(0.1, 1.0), min_users_per_step=100, min_hours_per_step=1.0, auto_promote=True)
    given = {"steps": [0.2, 0.4, 0.6], "min_users_per_step": 0, "min_hours_per_step": 0.5, "auto_promote": False}
    assert RolloutPlan.from_dict(given).to_dict(step=2) == dict(given, step=2)


@pytest.mark.parametrize(("plan", "message"), [
    ({}, "rollout.steps: give at least one share"),
    ({"steps": []}, "rollout.steps: give at least one share"),
    ({"steps": [0, 0.5]}, "rollout.steps: shares must rise strictly, each in (0, 1]"),
    ({"steps": [0.5, 1.01]}, "rollout.steps: shares must rise strictly, each in (0, 1]"),
    ({"steps": [0.2, 0.2]}, "rollout.steps: shares must rise strictly, each in (0, 1]"),
    ({"steps": [0.1, 0.5, 0.3]}, "rollout.steps: shares must rise strictly, each in (0, 1]"),
    ({"steps": [0.1], "min_users_per_step": -1}, "rollout.min_users_per_step and min_hours_per_step must be >= 0"),
    ({"steps": [0.1], "min_hours_per_step": -0.5}, "rollout.min_users_per_step and min_hours_per_step must be >= 0"),
])
def test_a_bad_plan_is_refused_with_the_field_named(plan, message):
    from experiment.rollout import RolloutPlan

    with pytest.raises(ValueError) as refused:
        RolloutPlan.from_dict(plan)
    assert str(refused.value) == message


def test_an_ended_experiment_keeps_the_decision_it_ended_with(sqlite_db):
    running = traffic.start(sqlite_db, share=0.5)
    traffic.write(sqlite_db, running, users=400, first_user=0, control=traffic.SAME, candidate=traffic.SAME, seed=0)
    lifecycle.rollback(sqlite_db, running.id, via="operator", reason="by hand")
    ended = experiments.get(sqlite_db, running.id).decision
    assert ended == {"via": "operator", "reason": "by hand"}
    after = experiment.evaluate(sqlite_db, running.id)  # an analysis of it can still be asked for
    assert after.experiment_id == running.id and after.decision["action"] == "keep_running"
    assert experiments.get(sqlite_db, running.id).decision == ended


def _paused_reason(share: float, step: int, steps: list[float]) -> str:
    return (f"rollout paused: the share was changed by hand to {share:.0%} while step {step + 1} of {len(steps)} is "
            f"{steps[step]:.0%}; PUT a new rollout to resume")


@pytest.mark.parametrize("by_hand", [0.1, 0.9])
def test_a_share_set_by_hand_mid_rollout_pauses_it_until_a_new_rollout_is_put(sqlite_db, by_hand):
    """An operator lowers the share in an incident (or raises it): the next hourly evaluation used to move it on to
    the plan's next step, undoing the operator's change."""
    steps = [0.05, 0.25, 0.5]
    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, dict(PLAN, steps=steps))
    assert _step(sqlite_db, running.id, 3000, 0).decision["rollout"]["did"] == "advanced"  # to 25%
    lifecycle.set_share(sqlite_db, running.id, by_hand, reason="incident")
    held = _step(sqlite_db, running.id, 3000, 3000, seed=1).decision["rollout"]
    assert held == {"did": "paused", "step": 1, "share": by_hand, "reason": _paused_reason(by_hand, 1, steps)}
    stored = experiments.get(sqlite_db, running.id)
    assert (stored.status, stored.candidate_share, stored.rollout["step"]) == ("running", by_hand, 1)
    assert experiments.list_events(sqlite_db, running.id)[-1].reason == "incident"
    lifecycle.set_rollout(sqlite_db, running.id, dict(PLAN, steps=[by_hand, 0.95]))  # the operator resumes
    resumed = _step(sqlite_db, running.id, 1000, 6000, seed=2).decision["rollout"]
    assert resumed == {"did": "advanced", "step": 1, "share": 0.95}


def test_a_share_set_by_hand_at_the_last_step_is_not_promoted(sqlite_db):
    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, PLAN)
    better = ArmBehaviour(up=0.75)
    assert _step(sqlite_db, running.id, 2000, 0, candidate=better).decision["rollout"]["did"] == "advanced"
    lifecycle.set_share(sqlite_db, running.id, 0.7)
    final = _step(sqlite_db, running.id, 2000, 2000, candidate=better, seed=1)
    assert final.action == "promote"
    assert final.decision["rollout"] == {"did": "paused", "step": 1, "share": 0.7,
                                         "reason": _paused_reason(0.7, 1, PLAN["steps"])}
    assert experiments.get(sqlite_db, running.id).status == "running"


def test_an_evaluation_whose_promote_verdict_was_overwritten_meanwhile_does_not_promote(sqlite_db, monkeypatch):
    """Another evaluation recorded `keep_running` between this one's verdict and its act: promote refuses (the
    recorded decision is what an operator sees), and the run says so instead of failing."""
    from experiment import rollout
    from store.models import Experiment

    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, dict(PLAN, steps=[0.5]))
    traffic.write(sqlite_db, experiments.get(sqlite_db, running.id), users=4000, candidate=ArmBehaviour(up=0.75))
    real = rollout._brief

    def overwritten(analysis):
        with sqlite_db.session() as session:
            session.get(Experiment, running.id).decision = {"action": "keep_running", "reason": "another look"}
        return real(analysis)

    monkeypatch.setattr(rollout, "_brief", overwritten)
    late = experiment.evaluate(sqlite_db, running.id)
    assert late.action == "promote" and late.decision["rollout"]["did"] == "stale", late.decision["rollout"]
    assert "no recorded promote decision (recorded: 'keep_running')" in late.decision["rollout"]["reason"]
    assert experiments.get(sqlite_db, running.id).status == "running"


def test_a_paused_rollout_still_rolls_back_on_a_breach(sqlite_db):
    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, PLAN)
    lifecycle.set_share(sqlite_db, running.id, 0.3)
    failing = _step(sqlite_db, running.id, 3000, 0, candidate=ArmBehaviour(error=0.3))
    assert failing.action == "roll_back" and failing.decision["rollout"]["did"] == "rolled_back"
    assert experiments.get(sqlite_db, running.id).status == "rolled_back"


def _overlapped(monkeypatch, db, experiment_id, where: str) -> list:
    """Another evaluation runs from start to finish at `where` in this one (`analyse`: just after its analysis;
    `_brief`: as it acts): the hourly flow beside `abloop evaluate`, or a retried run. Returns what it did."""
    from experiment import rollout

    real, other = getattr(rollout, where), []

    def overlapped(*args, **kwargs):
        result = real(*args, **kwargs)
        if not other:
            other.append(None)  # the other evaluation must not overlap itself
            other[0] = rollout.evaluate(db, experiment_id).decision["rollout"]
        return result

    monkeypatch.setattr(rollout, where, overlapped)
    return other


def test_an_evaluation_overlapped_by_one_that_stepped_does_not_step_again_on_its_older_analysis(sqlite_db,
                                                                                                monkeypatch):
    """Both analysed the 5% step: one moves the rollout to 25%, the other used to move it on to 50% at once, on
    the 5% step's numbers, so that the 25% step had no users and no hours."""
    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, dict(PLAN, steps=[0.05, 0.25, 0.5]))
    traffic.write(sqlite_db, experiments.get(sqlite_db, running.id), users=3000)
    other = _overlapped(monkeypatch, sqlite_db, running.id, "analyse")
    late = experiment.evaluate(sqlite_db, running.id)
    assert other == [{"did": "advanced", "step": 1, "share": 0.25}]
    stale = late.decision["rollout"]
    assert (stale["did"], stale["step"]) == ("stale", 1), stale
    assert stale["reason"].startswith("stale analysis: it ends in the phase at 5% from ")
    assert f"but experiment {running.id} has been at 25% since " in stale["reason"]
    assert experiments.get(sqlite_db, running.id).rollout["step"] == 1
    assert [e.to_share for e in experiments.list_events(sqlite_db, running.id)] == [0.0, 0.05, 0.25]


def test_an_evaluation_overlapped_by_one_that_reached_the_last_step_does_not_promote(sqlite_db, monkeypatch):
    """Its analysis is of the 25% step, after the other moved to the last one: promoting on it would skip the
    last step's minimum users and hours."""
    from store.models import Experiment, ExperimentEvent

    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, dict(PLAN, steps=[0.25, 0.5], min_hours_per_step=1.0))
    traffic.write(sqlite_db, experiments.get(sqlite_db, running.id), users=4000, candidate=ArmBehaviour(up=0.75))
    with sqlite_db.session() as session:  # the 25% step began two hours ago
        session.get(Experiment, running.id).started_at -= timedelta(hours=2)
        for event in session.query(ExperimentEvent).filter_by(experiment_id=running.id):
            event.ts -= timedelta(hours=2)
    other = _overlapped(monkeypatch, sqlite_db, running.id, "analyse")
    late = experiment.evaluate(sqlite_db, running.id)
    assert other == [{"did": "advanced", "step": 1, "share": 0.5}]
    assert late.action == "promote" and late.decision["rollout"]["did"] == "stale", late.decision["rollout"]
    assert experiments.get(sqlite_db, running.id).status == "running"


def test_an_evaluation_that_finds_the_experiment_ended_meanwhile_says_so(sqlite_db, monkeypatch):
    """Both see the breach; the other rolls back first. This one reports it, where it used to fail the run."""
    running = traffic.start(sqlite_db, share=0.0)
    lifecycle.set_rollout(sqlite_db, running.id, PLAN)
    traffic.write(sqlite_db, experiments.get(sqlite_db, running.id), users=3000, candidate=ArmBehaviour(error=0.3))
    other = _overlapped(monkeypatch, sqlite_db, running.id, "_brief")
    late = experiment.evaluate(sqlite_db, running.id)
    assert late.action == "roll_back" and other[0]["did"] == "rolled_back"
    assert late.decision["rollout"] == {"did": "ended", "step": 0,
                                        "reason": f"experiment {running.id} is rolled_back, not running"}
    assert [e.kind for e in experiments.list_events(sqlite_db, running.id)] == ["start", "rollout_step", "rolled_back"]
