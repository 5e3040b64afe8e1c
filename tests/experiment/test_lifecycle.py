"""Each life-cycle operation: what it changes on the experiment, what it starts, and the transition it records.

The admin API, the CLI, the flows and the rollout all act through these functions, so an operator's promote,
roll back or stop is exactly what is checked here: who serves afterwards, at what share, and why.
"""

from __future__ import annotations

import pytest

from experiment import lifecycle
from store import experiments, prompts
from store.models import Experiment
from tests.experiment import traffic


def _name_both_adapters(db, experiment_id: str) -> None:
    with db.session() as session:
        running = session.get(Experiment, experiment_id)
        running.control_adapter_id = "adapter-serving-now"
        running.candidate_adapter_id = "adapter-on-trial"
        running.candidate_model = "model-on-trial"


def _record_decision(db, experiment_id: str, decision: dict) -> None:
    with db.session() as session:
        session.get(Experiment, experiment_id).decision = decision


def _events(db, experiment_id: str) -> list[tuple]:
    return [(e.kind, e.from_share, e.to_share, e.reason) for e in experiments.list_events(db, experiment_id)]


def test_a_new_candidate_replaces_the_running_experiment_and_keeps_control(sqlite_db):
    first = traffic.start(sqlite_db, share=0.3)
    _name_both_adapters(sqlite_db, first.id)
    fresh = lifecycle.start_candidate(sqlite_db, base_url="http://new.test/v1", model="new-model",
                                      adapter_id="adapter-new", primary_metric="thumbs_up_rate")
    old = experiments.get(sqlite_db, first.id)
    assert old.status == "stopped" and old.decision == {"reason": "replaced by a new candidate"}
    assert _events(sqlite_db, first.id)[-1] == ("stopped", 0.3, 0.0, "replaced by a new candidate")
    stored = experiments.get(sqlite_db, fresh.id)
    assert experiments.get_running(sqlite_db).id == fresh.id != first.id
    assert (stored.status, stored.candidate_share, stored.primary_metric) == ("running", 0.3, "thumbs_up_rate")
    assert (stored.control_base_url, stored.control_model, stored.control_adapter_id) == (
        old.control_base_url, old.control_model, "adapter-serving-now")
    assert (stored.candidate_base_url, stored.candidate_model, stored.candidate_adapter_id) == (
        "http://new.test/v1", "new-model", "adapter-new")
    assert stored.candidate_prompt_template_id is None and stored.salt != old.salt
    assert _events(sqlite_db, fresh.id) == [("start", None, 0.3, "new candidate: new-model")]


def test_a_prompt_candidate_names_its_template_and_may_set_its_share(sqlite_db):
    traffic.start(sqlite_db, share=0.3)
    template = prompts.new_version(sqlite_db, system_prompt="Be brief.", template="Q: {question}", activate=False)
    fresh = lifecycle.start_candidate(sqlite_db, base_url="http://same.test/v1", model="same-model", share=0.1,
                                      prompt_template_id=template.id, reason="prompt trial")
    stored = experiments.get(sqlite_db, fresh.id)
    assert (stored.candidate_prompt_template_id, stored.candidate_share) == (template.id, 0.1)
    assert _events(sqlite_db, fresh.id) == [
        ("start", None, 0.1, f"prompt trial: same-model with prompt template {template.id}")]


def test_a_new_candidate_needs_a_running_experiment(sqlite_db):
    with pytest.raises(lifecycle.ExperimentNotFound, match="no running experiment"):
        lifecycle.start_candidate(sqlite_db, base_url="http://new.test/v1", model="m")


def test_promoting_makes_the_candidate_control_of_a_successor_at_share_zero(sqlite_db):
    running = traffic.start(sqlite_db, share=0.5)
    _name_both_adapters(sqlite_db, running.id)
    successor = lifecycle.promote(sqlite_db, running.id, force=True, via="cli", reason="the operator said so")
    ended = experiments.get(sqlite_db, running.id)
    assert ended.status == "promoted" and ended.ended_at is not None
    assert ended.decision == {"forced": True, "via": "cli", "reason": "the operator said so"}
    assert _events(sqlite_db, running.id)[-1] == ("promoted", 0.5, 0.0, "the operator said so")
    stored = experiments.get(sqlite_db, successor.id)
    assert (stored.status, stored.candidate_share, stored.candidate_base_url) == ("running", 0.0, None)
    assert (stored.control_base_url, stored.control_model, stored.control_adapter_id) == (
        ended.candidate_base_url, "model-on-trial", "adapter-on-trial")
    assert _events(sqlite_db, successor.id) == [("start", None, 0.0, f"successor of {running.id} (promoted)")]
    assert experiments.get_running(sqlite_db).id == successor.id


def test_a_forced_promotion_without_a_decision_says_so_and_one_with_a_decision_names_the_channel(sqlite_db):
    running = traffic.start(sqlite_db)
    lifecycle.promote(sqlite_db, running.id, force=True, via="api")
    assert experiments.get(sqlite_db, running.id).decision["reason"] == "forced by an operator"
    second = experiments.get_running(sqlite_db)
    lifecycle.start_candidate(sqlite_db, base_url="http://next.test/v1", model="next")
    third = experiments.get_running(sqlite_db)
    assert third.id != second.id
    _record_decision(sqlite_db, third.id, {"action": "promote", "reason": "candidate is better"})
    lifecycle.promote(sqlite_db, third.id, via="rollout", current={"action": "promote", "reason": "better"})
    decision = experiments.get(sqlite_db, third.id).decision
    assert decision == {"action": "promote", "reason": "promoted via rollout", "forced": False, "via": "rollout"}
    # Forcing what the numbers already back is not an operator overriding them.
    fourth = lifecycle.start_candidate(sqlite_db, base_url="http://more.test/v1", model="more")
    _record_decision(sqlite_db, fourth.id, {"action": "promote", "reason": "candidate is better"})
    lifecycle.promote(sqlite_db, fourth.id, force=True, via="api")
    assert experiments.get(sqlite_db, fourth.id).decision["reason"] == "promoted via api"


def test_promoting_without_a_recorded_promote_decision_is_refused_and_says_what_to_do(sqlite_db):
    running = traffic.start(sqlite_db)
    _record_decision(sqlite_db, running.id, {"action": "keep_running", "reason": "not yet"})
    with pytest.raises(lifecycle.NoPromoteDecision) as refused:
        lifecycle.promote(sqlite_db, running.id, via="cli")
    assert str(refused.value) == (f"experiment {running.id} has no recorded promote decision (recorded: "
                                  "'keep_running'); run `abloop evaluate` first or force it")
    assert experiments.get(sqlite_db, running.id).status == "running"


def test_a_recorded_promote_decision_that_no_longer_holds_is_refused_until_forced(sqlite_db):
    """Recorded as promote; then the candidate fails 30% of a wave of new users' requests. The record alone
    would still have promoted it: promote analyses again and says why it will not."""
    import experiment
    from experiment.decision import Policy
    from tests.experiment.traffic import ArmBehaviour

    running = traffic.start(sqlite_db)
    traffic.write(sqlite_db, running, users=1500, requests_per_user=2, control=ArmBehaviour(up=0.4),
                  candidate=ArmBehaviour(up=0.6))
    assert experiment.evaluate(sqlite_db, running.id).action == "promote"
    traffic.write(sqlite_db, running, users=3000, first_user=1500, control=ArmBehaviour(up=0.4),
                  candidate=ArmBehaviour(up=0.6, error=0.3), seed=1)
    assert experiments.get(sqlite_db, running.id).decision["action"] == "promote"  # the record, unchanged
    with pytest.raises(lifecycle.NoPromoteDecision) as refused:
        lifecycle.promote(sqlite_db, running.id, via="api", policy=Policy())
    assert str(refused.value).startswith(f"experiment {running.id}: its recorded promote decision no longer holds; "
                                         "the analysis now says roll_back: guardrail breached: error_rate")
    assert str(refused.value).endswith("; run `abloop evaluate` again or force it")
    assert experiments.get(sqlite_db, running.id).status == "running"
    # The policy is the caller's: one that checks no guardrail finds the promote still there.
    lifecycle.promote(sqlite_db, running.id, via="api", policy=Policy(guardrails=()))
    assert experiments.get(sqlite_db, running.id).status == "promoted"


def test_promoting_a_prompt_candidate_activates_its_template(sqlite_db):
    traffic.start(sqlite_db)
    active_before = prompts.active(sqlite_db)
    template = prompts.new_version(sqlite_db, system_prompt="Be brief.", template="Q: {question}", activate=False)
    assert prompts.active(sqlite_db).id == active_before.id
    trial = lifecycle.start_candidate(sqlite_db, base_url="http://same.test/v1", model="m",
                                      prompt_template_id=template.id)
    lifecycle.promote(sqlite_db, trial.id, force=True, via="test")
    assert prompts.active(sqlite_db).id == template.id


@pytest.mark.parametrize("end", ["rollback", "stop"])
def test_rolling_back_or_stopping_keeps_control_for_everyone(sqlite_db, end):
    running = traffic.start(sqlite_db, share=0.25)
    _name_both_adapters(sqlite_db, running.id)
    operation = getattr(lifecycle, end)
    successor = operation(sqlite_db, running.id, via="api")
    outcome, default_reason = {"rollback": ("rolled_back", "rolled back via api"),
                               "stop": ("stopped", "stopped via api")}[end]
    ended = experiments.get(sqlite_db, running.id)
    assert ended.status == outcome and ended.decision == {"via": "api", "reason": default_reason}
    assert _events(sqlite_db, running.id)[-1] == (outcome, 0.25, 0.0, default_reason)
    stored = experiments.get(sqlite_db, successor.id)
    assert (stored.control_base_url, stored.control_model, stored.control_adapter_id) == (
        ended.control_base_url, ended.control_model, "adapter-serving-now")
    assert (stored.candidate_base_url, stored.candidate_share, stored.status) == (None, 0.0, "running")
    assert _events(sqlite_db, successor.id) == [("start", None, 0.0, f"successor of {running.id} ({outcome})")]


def test_stopping_keeps_the_last_decision_beside_who_stopped_it(sqlite_db):
    running = traffic.start(sqlite_db)
    _record_decision(sqlite_db, running.id, {"action": "keep_running", "reason": "no difference yet"})
    lifecycle.stop(sqlite_db, running.id, via="cli", reason="budget spent")
    assert experiments.get(sqlite_db, running.id).decision == {"action": "keep_running", "via": "cli",
                                                               "reason": "budget spent"}


def test_an_ended_or_unknown_experiment_cannot_change(sqlite_db):
    running = traffic.start(sqlite_db)
    lifecycle.stop(sqlite_db, running.id, via="test", reason="done")
    for act in (lambda: lifecycle.set_share(sqlite_db, running.id, 0.2),
                lambda: lifecycle.rollback(sqlite_db, running.id, via="test"),
                lambda: lifecycle.promote(sqlite_db, running.id, force=True, via="test")):
        with pytest.raises(lifecycle.ExperimentNotRunning, match=f"experiment {running.id} is stopped, not running"):
            act()
    with pytest.raises(lifecycle.ExperimentNotFound, match="unknown experiment 'nope'"):
        lifecycle.set_share(sqlite_db, "nope", 0.2)
    with pytest.raises(ValueError, match="unknown outcome 'won'"):
        lifecycle.conclude(sqlite_db, experiments.get_running(sqlite_db).id, outcome="won")


def test_an_experiment_without_a_candidate_has_nothing_to_promote_or_roll_out(sqlite_db):
    running = traffic.start(sqlite_db)
    successor = lifecycle.stop(sqlite_db, running.id, via="test")
    with pytest.raises(lifecycle.ExperimentNotRunning, match=f"experiment {successor.id} has no candidate to promote"):
        lifecycle.promote(sqlite_db, successor.id, force=True, via="test")
    with pytest.raises(lifecycle.ExperimentNotRunning, match="has no candidate to roll out"):
        lifecycle.set_rollout(sqlite_db, successor.id, {"steps": [0.1, 0.5]})
    assert experiments.get(sqlite_db, successor.id).status == "running"


def test_a_share_change_and_a_rollout_start_are_recorded_with_their_reasons(sqlite_db):
    running = traffic.start(sqlite_db, share=0.5)
    lifecycle.set_share(sqlite_db, running.id, 0.2)
    lifecycle.set_share(sqlite_db, running.id, 0.2, reason="the same share again records nothing")
    lifecycle.set_rollout(sqlite_db, running.id, {"steps": [0.05, 0.25, 0.5]})
    stored = experiments.get(sqlite_db, running.id)
    assert stored.candidate_share == 0.05 and stored.rollout["step"] == 0
    assert _events(sqlite_db, running.id)[1:] == [
        ("share", 0.5, 0.2, "share changed by an operator"),
        ("rollout_step", 0.2, 0.05, "rollout started: step 1 of 3 (5%)"),
    ]


def _force_promote(db, experiment_id):
    return lifecycle.promote(db, experiment_id, force=True, via="operator")


def _roll_back(db, experiment_id):
    return lifecycle.rollback(db, experiment_id, via="rollout")


def _new_candidate(db, _experiment_id):
    return lifecycle.start_candidate(db, base_url="http://next.test/v1", model="next")


def _race(db, monkeypatch, first, second) -> list:
    """Run both operations at once, each held just after its check that the experiment runs, at its first write.

    Where the check holds the experiment, the loser waits at its check and never meets the winner at the
    barrier: the winner goes on after a second (well within SQLite's busy timeout), commits, and the loser
    finds the experiment ended.
    """
    import contextlib
    import threading

    barrier = threading.Barrier(2, timeout=1)
    real_add_event = lifecycle.add_event

    def held(*args, **kwargs):
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()
        return real_add_event(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "add_event", held)
    running = experiments.get_running(db)
    outcomes: list = [None, None]

    def run(n, operation):
        try:
            outcomes[n] = operation(db, running.id)
        except Exception as error:  # noqa: BLE001 - the outcome is what is checked
            outcomes[n] = error

    threads = [threading.Thread(target=run, args=(n, op)) for n, op in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


@pytest.mark.parametrize(("first", "second"), [(_force_promote, _force_promote), (_force_promote, _roll_back),
                                               (_new_candidate, _new_candidate)])
def test_of_two_concurrent_changes_of_one_experiment_one_wins_and_the_other_finds_it_ended(db, monkeypatch,
                                                                                          first, second):
    """An operator's promote beside the rollout's roll-back, or two replicas' promotes: both used to succeed and
    leave two running successors. On SQLite and on PostgreSQL exactly one succeeds; the other gets the error
    the API answers with 409."""
    original = traffic.start(db, share=0.5)
    outcomes = _race(db, monkeypatch, first, second)
    won = [outcome for outcome in outcomes if isinstance(outcome, Experiment)]
    lost = [outcome for outcome in outcomes if not isinstance(outcome, Experiment)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    ended = experiments.get(db, original.id)
    assert isinstance(lost[0], lifecycle.ExperimentNotRunning), lost
    assert str(lost[0]) == f"experiment {original.id} is {ended.status}, not running"
    assert [kind for kind, *_ in _events(db, original.id)] == ["start", ended.status]
    running = [e for e in experiments.list_experiments(db) if e.status == "running"]
    assert [e.id for e in running] == [won[0].id]


def _ramped_to(db, experiment_id: str, step: int) -> None:
    """The rollout at `step` of its plan, as its evaluations would have left it."""
    with db.session() as session:
        running = session.get(Experiment, experiment_id)
        running.rollout = dict(running.rollout, step=step)
        running.candidate_share = running.rollout["steps"][step]


def test_a_new_candidate_mid_rollout_starts_the_plan_over_at_its_first_step(sqlite_db):
    """It used to inherit the ramped share (25% of users for an untested model) and lose the plan, so that a
    breach was rolled back by nobody."""
    running = traffic.start(sqlite_db, share=0.0)
    plan = {"steps": [0.05, 0.25, 0.5], "min_users_per_step": 300, "min_hours_per_step": 0.5, "auto_promote": False}
    lifecycle.set_rollout(sqlite_db, running.id, plan)
    _ramped_to(sqlite_db, running.id, 1)
    fresh = lifecycle.start_candidate(sqlite_db, base_url="http://next.test/v1", model="next")
    stored = experiments.get(sqlite_db, fresh.id)
    assert (stored.candidate_share, stored.rollout) == (0.05, dict(plan, step=0))
    assert _events(sqlite_db, fresh.id) == [
        ("start", None, 0.05, "new candidate: next; rollout carried over: step 1 of 3 (5%)")]
    assert _events(sqlite_db, running.id)[-1] == ("stopped", 0.25, 0.0, "replaced by a new candidate")
    # A share asked for is what it starts at, and the plan stays behind, as without a rollout.
    asked = lifecycle.start_candidate(sqlite_db, base_url="http://more.test/v1", model="more", share=0.2)
    stored = experiments.get(sqlite_db, asked.id)
    assert (stored.candidate_share, stored.rollout) == (0.2, None)
