"""The analysis and its decision on traffic written the way the proxy writes it."""

from __future__ import annotations

import json
import random
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import insert

import experiment
from abloop.cli import main
from experiment import lifecycle
from experiment.analysis import analyse
from experiment.assignment import assign_arm, bucket
from experiment.decision import Policy
from experiment.rollout import record_decision
from store import experiments
from store.models import AnswerScore, Experiment, Feedback, SearchEvent, new_id, utcnow
from tests.experiment import traffic
from tests.experiment.traffic import ArmBehaviour


def test_clear_winner_is_promoted_and_the_decision_unlocks_promote(db):
    running = traffic.start(db)
    traffic.write(db, running, users=1500, control=ArmBehaviour(up=0.45), candidate=ArmBehaviour(up=0.62))
    analysis = experiment.analyse(db, running.id)
    assert analysis.action == "promote", analysis.decision
    primary = analysis.primary
    assert primary["metric"] == "satisfaction" and primary["ci"][0] > 0
    # The sequential interval is wider than the fixed-horizon one it is reported beside.
    fixed = primary["fixed_horizon"]["ci"]
    assert primary["ci"][0] < fixed[0] and primary["ci"][1] > fixed[1]
    assert analysis.thumbs_up["p_value"] < 0.001 and "fixed-horizon" in analysis.thumbs_up["label"]
    assert analysis.arms["control"]["users"] + analysis.arms["candidate"]["users"] == 1500
    with pytest.raises(lifecycle.NoPromoteDecision):
        lifecycle.promote(db, running.id, via="test")
    record_decision(db, analysis)
    assert experiments.get(db, running.id).decision["action"] == "promote"
    lifecycle.promote(db, running.id, via="test")
    assert experiments.get(db, running.id).status == "promoted"


def test_ratings_alone_can_decide(sqlite_db):
    running = traffic.start(sqlite_db)
    traffic.write(sqlite_db, running, users=4000, control=ArmBehaviour(up=None, rating_mean=3.0),
                  candidate=ArmBehaviour(up=None, rating_mean=3.33))
    analysis = experiment.analyse(sqlite_db, running.id)
    assert analysis.arms["control"]["thumbs"] == 0 and analysis.arms["candidate"]["ratings"] > 1500
    assert analysis.metrics["mean_rating"]["ci"][0] > 0
    assert analysis.action == "promote", analysis.decision


def test_halving_the_feedback_rate_is_flagged_not_hidden(sqlite_db):
    """Thumbs-up among responders is equal (0.6 vs 0.6); per request it halves (0.24 vs 0.12)."""
    running = traffic.start(sqlite_db)
    traffic.write(sqlite_db, running, users=2000, control=ArmBehaviour(up=0.6, feedback=0.4),
                  candidate=ArmBehaviour(up=0.6, feedback=0.2))
    analysis = experiment.analyse(sqlite_db, running.id)
    assert analysis.metrics["thumbs_up_rate"]["ci"][0] < 0 < analysis.metrics["thumbs_up_rate"]["ci"][1]
    per_request = analysis.metrics["thumbs_up_per_request"]
    assert per_request["control"] == pytest.approx(0.24, abs=0.03)
    assert per_request["candidate"] == pytest.approx(0.12, abs=0.03)
    assert per_request["ci"][1] < 0
    assert analysis.guardrails["results"]["feedback_rate"]["status"] == "breached"
    assert analysis.action == "roll_back" and "feedback_rate" in analysis.decision["reason"]


def test_guardrails_wait_for_the_minimum_sample(sqlite_db):
    running = traffic.start(sqlite_db)
    traffic.write(sqlite_db, running, users=120, control=ArmBehaviour(error=0.0),
                  candidate=ArmBehaviour(error=0.3), seed=3)
    small = experiment.analyse(sqlite_db, running.id, Policy(min_users_per_arm=100))
    assert small.arms["candidate"]["error_rate"] > 0.15  # plainly worse as a point estimate...
    assert small.action == "not_enough_data" and not small.guardrails["checked"]  # ...but not yet tested
    traffic.write(sqlite_db, running, users=600, control=ArmBehaviour(error=0.0),
                  candidate=ArmBehaviour(error=0.3), seed=4, first_user=120)
    large = experiment.analyse(sqlite_db, running.id, Policy(min_users_per_arm=100))
    assert large.action == "roll_back" and "error_rate" in large.decision["reason"]
    assert large.guardrails["results"]["error_rate"]["status"] == "breached"


def test_a_small_noisy_error_difference_is_not_a_breach(sqlite_db):
    running = traffic.start(sqlite_db)
    traffic.write(sqlite_db, running, users=800, control=ArmBehaviour(error=0.01),
                  candidate=ArmBehaviour(error=0.02), seed=5)
    analysis = experiment.analyse(sqlite_db, running.id)
    assert analysis.guardrails["results"]["error_rate"]["status"] == "ok"
    assert analysis.action == "keep_running"


def test_no_difference_keeps_running_and_little_data_says_so(sqlite_db):
    running = traffic.start(sqlite_db)
    traffic.write(sqlite_db, running, users=60)
    assert experiment.analyse(sqlite_db, running.id).action == "not_enough_data"
    traffic.write(sqlite_db, running, users=2000, seed=1, first_user=60)
    assert experiment.analyse(sqlite_db, running.id).action == "keep_running"


def test_sample_ratio_mismatch_blocks_any_verdict(sqlite_db):
    running = traffic.start(sqlite_db, share=0.5)
    # Users bucketed as if the share were 0.3 while the experiment says 0.5: assignment is broken.
    traffic.write(sqlite_db, running, users=2000, share=0.3, candidate=ArmBehaviour(up=0.8))
    analysis = experiment.analyse(sqlite_db, running.id)
    assert analysis.srm["mismatch"] and analysis.srm["p_value"] < 0.001
    assert analysis.action == "keep_running" and "sample ratio" in analysis.decision["reason"]


@pytest.mark.parametrize(("stale", "mismatch"), [(1000, True), (4, False)])
def test_a_full_share_with_users_in_the_arm_it_leaves_empty_is_a_broken_split(sqlite_db, stale, mismatch):
    """No chi-square tests a 100% phase; a replica still serving 50% (here 1,000 of 2,000 new users on control)
    would otherwise promote on a split nobody randomised. A few users, as a replica's refresh lag puts there in
    a phase's first seconds, are allowed for."""
    running = traffic.start(sqlite_db, share=0.5)
    lifecycle.set_share(sqlite_db, running.id, 1.0)
    full = experiments.get(sqlite_db, running.id)
    traffic.write(sqlite_db, full, users=2000 - stale, candidate=ArmBehaviour(up=0.8))
    traffic.write(sqlite_db, full, users=stale, first_user=5000, share=0.0, seed=1)  # all on control
    analysis = experiment.analyse(sqlite_db, running.id)
    phase = analysis.phases[-1]
    assert phase["users"] == [stale, 2000 - stale] and phase["p_value"] is None
    assert phase["mismatch"] is mismatch and analysis.srm["mismatch"] is mismatch
    if mismatch:
        assert analysis.action == "keep_running" and "sample ratio" in analysis.decision["reason"]
        assert f"{stale} of 2000 new users in the arm it leaves empty" in analysis.decision["reason"]


def test_a_ramp_is_checked_per_phase_and_movers_are_counted_once(sqlite_db):
    running = traffic.start(sqlite_db, share=0.1)
    traffic.write(sqlite_db, running, users=1500, requests_per_user=2, ts=utcnow() - timedelta(hours=2))
    before_the_ramp = utcnow()
    lifecycle.set_share(sqlite_db, running.id, 0.5, reason="ramp")
    ramped = experiments.get(sqlite_db, running.id)
    # The same users come back (some now bucketed to the candidate) and new ones arrive.
    traffic.write(sqlite_db, ramped, users=3000, requests_per_user=2, ts=utcnow() + timedelta(seconds=1), seed=2)
    analysis = experiment.analyse(sqlite_db, running.id)
    assert [p["share"] for p in analysis.phases] == [0.1, 0.5]
    assert not analysis.srm["mismatch"], analysis.srm
    assert all(p["p_value"] > 0.001 for p in analysis.phases)
    # Users 0..1499 with buckets in [1000, 5000) moved from control to candidate (about 40% of them): seen in
    # both arms, and left out whole, as is every phase-1 user with such a bucket, whether or not they came back.
    moved = analysis.assignment["users_in_both_arms"]
    assert 500 < moved < 700
    with sqlite_db.session() as session:
        first_arm: dict[str, str] = {}
        for user, arm in session.query(SearchEvent.user_id, SearchEvent.arm).order_by(SearchEvent.ts):
            first_arm.setdefault(user, arm)
    phase_1 = {f"test-user-{n}" for n in range(1500)}
    movable = {user for user in phase_1 if 1000 <= bucket(running.salt, user) < 5000}
    assert analysis.assignment["users_left_out"] == len(movable) == moved  # here every phase-1 user came back
    assert analysis.assignment["requests_left_out"] == 4 * len(movable)
    assert analysis.assignment["requests_excluded"] == 0
    then = analyse(sqlite_db, running.id, until=before_the_ramp)  # no share change had moved anyone yet
    assert then.assignment["users_left_out"] == 0 and sum(then.arms[arm]["users"] for arm in then.arms) == 1500
    # The others belong to the arm of their first request in time (event ids are random, not ordered).
    kept = [arm for user, arm in first_arm.items() if user not in movable]
    assert [analysis.arms[arm]["users"] for arm in ("control", "candidate")] == [
        kept.count(arm) for arm in ("control", "candidate")]
    assert analysis.action != "promote" and analysis.action != "roll_back"


def test_a_ramp_with_returning_users_does_not_read_a_drift_over_time_as_an_effect(sqlite_db):
    """A/A, 10% -> 50%, and everyone likes answers more after the ramp. Cutting only the returning movers'
    later requests left a control arm weighted to the time before the ramp: this promoted (+0.04)."""
    running = traffic.start(sqlite_db, share=0.1)
    traffic.write(sqlite_db, running, users=4000, requests_per_user=2, control=ArmBehaviour(up=0.3),
                  candidate=ArmBehaviour(up=0.3), ts=utcnow() - timedelta(hours=2))
    lifecycle.set_share(sqlite_db, running.id, 0.5, reason="ramp")
    traffic.write(sqlite_db, experiments.get(sqlite_db, running.id), users=4000, requests_per_user=2,
                  control=ArmBehaviour(up=0.6), candidate=ArmBehaviour(up=0.6), ts=utcnow() + timedelta(seconds=1),
                  seed=5)
    analysis = experiment.analyse(sqlite_db, running.id)
    satisfaction = analysis.metrics["satisfaction"]
    low, high = satisfaction["ci"]
    assert low < 0 < high and abs(satisfaction["difference"]) < 0.02, satisfaction
    assert analysis.action == "keep_running", analysis.decision


@pytest.mark.parametrize(("shares", "moved"), [
    ([0.5], [(5000, 5000)]),  # one phase: nobody moves
    ([0.1, 0.5], [(1000, 5000), (5000, 5000)]),
    ([0.1, 0.5, 0.3], [(1000, 5000), (3000, 5000), (3000, 3000)]),  # up, then partly back down
    ([0.4, 0.2, 0.3], [(2000, 4000), (2000, 3000), (3000, 3000)]),
])
def test_the_buckets_a_later_share_moves_are_those_between_its_lowest_and_highest_cut(shares, moved):
    from experiment.collect import _moved_buckets
    from experiment.phases import Phase

    phases = [Phase(n, share, utcnow(), None, "test") for n, share in enumerate(shares)]
    assert _moved_buckets(phases) == moved


def test_cuped_uses_feedback_from_before_the_experiment(sqlite_db):
    running = traffic.start(sqlite_db)
    before = experiments.get(sqlite_db, running.id).started_at - timedelta(days=2)
    # Each user's taste persists: their pre-period thumbs predict their in-experiment thumbs.
    traffic.write(sqlite_db, running, users=1000, requests_per_user=4, propensity_sd=0.3, seed=7, ts=before)
    with sqlite_db.session() as session:  # move those rows out of the experiment, into its past
        session.query(SearchEvent).filter(SearchEvent.ts < running.started_at).update(
            {SearchEvent.experiment_id: "an-older-experiment"})
    traffic.write(sqlite_db, running, users=1000, requests_per_user=4, propensity_sd=0.3, seed=7)
    analysis = experiment.analyse(sqlite_db, running.id)
    cuped = analysis.metrics["satisfaction"]["cuped"]
    assert cuped is not None and cuped["variance_reduction"] > 0.2, cuped
    without = experiment.analyse(sqlite_db, running.id, Policy(cuped=False)).metrics["satisfaction"]
    assert without["cuped"] is None
    assert analysis.metrics["satisfaction"]["std_error"] < without["std_error"]


def test_cuped_on_a_primary_answer_score_uses_the_scores_of_an_earlier_experiment(sqlite_db):
    """The users' answers were scored in the experiment before this one: how grounded a user's answers are
    persists (their questions do), so that history narrows the interval on this one's answer score."""
    running = traffic.start(sqlite_db)
    started = experiments.get(sqlite_db, running.id).started_at
    quiet = ArmBehaviour(feedback=0.0)
    traffic.write(sqlite_db, running, users=600, requests_per_user=3, control=quiet, candidate=quiet, seed=3,
                  ts=started - timedelta(days=3))
    with sqlite_db.session() as session:
        session.query(SearchEvent).filter(SearchEvent.ts < started).update(
            {SearchEvent.experiment_id: "an-older-experiment"})
    traffic.write(sqlite_db, running, users=600, requests_per_user=3, control=quiet, candidate=quiet, seed=4)
    rng = np.random.default_rng(5)
    users = sorted({f"test-user-{n}" for n in range(600)})
    quality = dict(zip(users, rng.normal(0.6, 0.15, len(users)), strict=True))
    with sqlite_db.session() as session:
        events = session.query(SearchEvent.id, SearchEvent.user_id, SearchEvent.arm, SearchEvent.experiment_id).all()
        lift = {(running.id, "candidate"): 0.03}
        session.execute(insert(AnswerScore), [
            {"id": new_id(), "event_id": event_id, "method": "grounding",
             "score": float(np.clip(quality[user] + lift.get((experiment_id, arm), 0.0) + rng.normal(0, 0.05), 0, 1))}
            for event_id, user, arm, experiment_id in events
        ])
        session.get(Experiment, running.id).primary_metric = "answer_score"
    adjusted = experiment.analyse(sqlite_db, running.id).metrics["answer_score"]
    unadjusted = experiment.analyse(sqlite_db, running.id, Policy(cuped=False)).metrics["answer_score"]
    assert unadjusted["cuped"] is None
    assert adjusted["cuped"]["users_with_pre"] == list(adjusted["users"])  # every user had scored answers before
    assert adjusted["cuped"]["variance_reduction"] > 0.8, adjusted["cuped"]
    assert adjusted["std_error"] < 0.5 * unadjusted["std_error"]
    assert adjusted["ci"][0] > 0 and adjusted["difference"] == pytest.approx(0.03, abs=0.01)


def test_answer_scores_are_reported_per_arm_and_can_be_primary(sqlite_db):
    running = traffic.start(sqlite_db)
    traffic.write(sqlite_db, running, users=400, control=ArmBehaviour(feedback=0.0),
                  candidate=ArmBehaviour(feedback=0.0))
    with sqlite_db.session() as session:
        events = session.query(SearchEvent.id, SearchEvent.arm).all()
        session.execute(insert(AnswerScore), [
            {"id": new_id(), "event_id": event_id, "method": "grounding",
             "score": 0.8 if arm == "candidate" else 0.6, "created_at": utcnow()}
            for event_id, arm in events
        ])
    with sqlite_db.session() as session:
        session.get(type(running), running.id).primary_metric = "answer_score"
    analysis = experiment.analyse(sqlite_db, running.id)
    assert analysis.arms["candidate"]["answer_score"] == pytest.approx(0.8)
    assert analysis.arms["control"]["answers_scored"] > 150
    assert analysis.primary["metric"] == "answer_score" and analysis.action == "promote"


def _heavy_responder(db, experiment_id: str, user: str, arm: str, *, searches: int, ups: int) -> None:
    """`searches` more searches by `user` on `arm`, each with a thumbs: the first `ups` up, the rest down."""
    moment = utcnow()
    ids = [new_id() for _ in range(searches)]
    with db.session() as session:
        session.execute(insert(SearchEvent), [
            {"id": event_id, "ts": moment, "user_id": user, "experiment_id": experiment_id, "arm": arm,
             "served_arm": arm, "query": "q", "messages": [], "retrieved": {}, "status": "ok",
             "timings": {"total": 100.0}} for event_id in ids])
        session.execute(insert(Feedback), [
            {"id": new_id(), "event_id": event_id, "ts": moment, "thumbs": "up" if n < ups else "down"}
            for n, event_id in enumerate(ids)])


def test_a_verdict_and_a_guardrail_need_enough_users_behind_their_signals(sqlite_db):
    """One heavy responder per arm (60 thumbs each) and a few scored answers: enough signals, too few users.
    The delta method's variance rests on users; with one it was 0 and 30/60 against 33/60 promoted."""
    running = traffic.start(sqlite_db)
    traffic.write(sqlite_db, running, users=400, control=ArmBehaviour(feedback=0.0),
                  candidate=ArmBehaviour(feedback=0.0))
    with sqlite_db.session() as session:
        events = session.query(SearchEvent.id, SearchEvent.user_id, SearchEvent.arm).order_by(SearchEvent.user_id)
        by_arm = {arm: [(event_id, user) for event_id, user, served in events if served == arm]
                  for arm in ("control", "candidate")}
    for arm, ups in (("control", 30), ("candidate", 33)):
        _heavy_responder(sqlite_db, running.id, by_arm[arm][0][1], arm, searches=60, ups=ups)

    def score(users: slice) -> None:  # the candidate's answers far less grounded (guardrail margin 0.05)
        with sqlite_db.session() as session:
            session.execute(insert(AnswerScore), [
                {"id": new_id(), "event_id": event_id, "method": "grounding", "created_at": utcnow(),
                 "score": (0.3 if arm == "candidate" else 0.9) + 0.01 * (n % 5)}
                for arm, rows in by_arm.items() for n, (event_id, _user) in enumerate(rows[users])])

    score(slice(1, 6))
    few = experiment.analyse(sqlite_db, running.id)
    assert few.metrics["satisfaction"] is None  # one user an arm gives the ratio no variance to speak of
    assert few.action == "not_enough_data", few.decision
    assert few.decision["reason"].startswith("satisfaction observations per arm [60, 60] from [1, 1] users")
    assert few.arms["candidate"]["answer_score"] < few.arms["control"]["answer_score"] - 0.5  # on five users an arm
    assert few.metrics["answer_score"] is None  # five users an arm are no comparison
    assert few.guardrails["results"]["answer_score"]["status"] == "no data"
    assert few.guardrails["results"]["error_rate"]["status"] == "ok"  # every user has requests

    score(slice(6, 41))  # 35 more: 40 users an arm
    enough = experiment.analyse(sqlite_db, running.id)
    assert enough.metrics["answer_score"]["responders"] == [40, 40]
    assert enough.guardrails["results"]["answer_score"]["status"] == "breached"
    assert enough.action == "roll_back" and "answer_score" in enough.decision["reason"]


def test_a_guardrail_waits_while_its_numerator_rests_on_a_few_users(sqlite_db):
    """A/A-like: nobody on the candidate gave feedback, two heavy users on control did. The feedback rate's
    denominator (requests) has every user behind it, its numerator two: that is those two users, not a drop."""
    running = traffic.start(sqlite_db)
    traffic.write(sqlite_db, running, users=400, control=ArmBehaviour(feedback=0.0),
                  candidate=ArmBehaviour(feedback=0.0))
    with sqlite_db.session() as session:
        controls = [user for (user,) in session.query(SearchEvent.user_id).filter(SearchEvent.arm == "control")
                    .order_by(SearchEvent.user_id)]

    def give_feedback(users: list[str], searches: int) -> None:
        for user in users:
            _heavy_responder(sqlite_db, running.id, user, "control", searches=searches, ups=searches)

    give_feedback(controls[:2], 400)
    few = experiment.analyse(sqlite_db, running.id, Policy(min_users_per_arm=100, min_responders_per_arm=20))
    rate = few.metrics["feedback_rate"]
    assert rate["numerator_users"] == [2, 0] and rate["control"] > 0.7 and rate["candidate"] == 0
    # The candidate's no-feedback-at-all has no spread: its variance is the pooled one, not 0.
    assert rate["ci"][1] > -0.2 * rate["control"]
    assert few.guardrails["results"]["feedback_rate"]["status"] != "breached"
    assert few.action != "roll_back", few.decision

    give_feedback(controls[2:25], 40)  # 25 users behind it now: a real difference between the arms
    enough = experiment.analyse(sqlite_db, running.id, Policy(min_users_per_arm=100, min_responders_per_arm=20))
    assert enough.metrics["feedback_rate"]["numerator_users"] == [25, 0]
    assert enough.guardrails["results"]["feedback_rate"]["status"] == "breached"
    assert enough.action == "roll_back" and "feedback_rate" in enough.decision["reason"]


def test_a_phase_whose_smaller_arm_has_too_few_responders_is_left_out_of_the_comparison():
    """A 2% first phase of 3,000 users with 4 candidate users who gave feedback, beside a 50% phase: weighted by
    its users it would carry the comparison on those four."""
    from experiment.analysis import analyse_collected
    from experiment.metrics import COLUMNS, ArmUsers, Collected

    def arm(thumbs_by_phase: list[np.ndarray]) -> ArmUsers:
        thumbs = np.concatenate(thumbs_by_phase)
        columns = {column: np.zeros(thumbs.size) for column in COLUMNS}
        columns.update(requests=np.maximum(thumbs, 1.0), thumbs=thumbs, satisfaction_n=thumbs,
                       thumbs_up=np.floor(thumbs * 0.3), satisfaction_sum=np.floor(thumbs * 0.3))
        strata = np.concatenate([np.full(part.size, n) for n, part in enumerate(thumbs_by_phase)])
        return ArmUsers([f"u{n}" for n in range(thumbs.size)], columns, np.full(thumbs.size, 100.0), strata)

    def phase(users: int, responders: int) -> np.ndarray:
        thumbs = np.zeros(users)
        thumbs[:responders] = 10.0 + np.arange(responders) % 7
        return thumbs

    control = arm([phase(2940, 90), phase(500, 30)])
    candidate = arm([phase(60, 4), phase(500, 30)])
    experiment = Experiment(id="e", candidate_base_url="http://c", candidate_share=0.5, status="running",
                            primary_metric=None, salt="s")
    analysis = analyse_collected(Collected(experiment, {"control": control, "candidate": candidate}, []),
                                 Policy(cuped=False, min_responders_per_arm=20))
    assert analysis.metrics["satisfaction"]["strata"] == 1  # the 50% phase alone: 60 x 94/3000 < 20 expected
    assert analysis.metrics["satisfaction"]["users"] == [500, 500]
    assert analysis.metrics["error_rate"]["strata"] == 2  # every user has requests: 60 users are enough there


def test_a_breach_on_a_numerator_of_few_users_waits():
    """The guardrail alone: an interval beyond the margin that rests on fewer users than the minimum."""
    from experiment.analysis import _guardrails

    comparison = {"control": 0.5, "candidate": 0.1, "difference": -0.4, "ci": [-0.6, -0.2], "higher_is_better": True,
                  "responders": [200, 200]}
    policy = Policy(min_users_per_arm=100, min_responders_per_arm=20)
    few = _guardrails({"feedback_rate": dict(comparison, numerator_users=[12, 7])}, (200, 200), policy)
    enough = _guardrails({"feedback_rate": dict(comparison, numerator_users=[13, 7])}, (200, 200), policy)
    assert few["results"]["feedback_rate"]["status"] == "waiting for sample" and few["breached"] == []
    assert enough["results"]["feedback_rate"]["status"] == "breached" and len(enough["breached"]) == 1


def test_feedback_rows_on_one_event_count_once_for_the_feedback_rate(sqlite_db):
    running = traffic.start(sqlite_db)
    silent = ArmBehaviour(feedback=0.0)
    traffic.write(sqlite_db, running, users=10, control=silent, candidate=silent)
    with sqlite_db.session() as session:
        event_id, arm = session.query(SearchEvent.id, SearchEvent.arm).first()
        for thumbs in ("up", "down"):
            session.execute(insert(Feedback), [{"id": new_id(), "event_id": event_id, "ts": utcnow(),
                                                "thumbs": thumbs}])
    summary = experiment.analyse(sqlite_db, running.id).arms[arm]
    assert summary["thumbs"] == 2 and summary["feedback_rate"] == pytest.approx(1 / summary["requests"])


def test_abloop_evaluate_json_prints_the_analysis(db, monkeypatch, capsys):
    running = traffic.start(db)
    traffic.write(db, running, users=300)
    monkeypatch.setenv("DATABASE_URL", db.url)
    main(["evaluate", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["experiment_id"] == running.id
    assert set(printed["arms"]) == {"control", "candidate"}
    assert printed["decision"]["action"] == "keep_running"
    for key in ("thumbs_up", "rating", "srm", "guardrails", "decision", "metrics", "primary", "phases"):
        assert key in printed
    assert {"lift", "ci", "p_value", "chance_to_win"} <= set(printed["thumbs_up"])
    assert experiments.get(db, running.id).decision["action"] == "keep_running"


def test_abloop_evaluate_json_on_an_empty_store_is_not_enough_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    main(["evaluate", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["experiment_id"] is None and printed["decision"]["action"] == "not_enough_data"


def test_abloop_evaluate_of_an_unknown_experiment_is_one_line_and_non_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--json", "--experiment", "nope"])
    message = str(exit_.value.code)
    assert "unknown experiment" in message and "\n" not in message
    assert capsys.readouterr().out == ""


def test_a_ramp_during_a_drift_is_not_read_as_a_treatment_effect(sqlite_db):
    """Both arms' users like answers more after the ramp: the arms drew their users from the two phases in
    different proportions, so a pooled comparison calls the candidate better; within phases it is not."""
    running = traffic.start(sqlite_db, share=0.1)
    traffic.write(sqlite_db, running, users=2000, control=ArmBehaviour(up=0.3), candidate=ArmBehaviour(up=0.3),
                  ts=utcnow() - timedelta(hours=2))
    lifecycle.set_share(sqlite_db, running.id, 0.5, reason="ramp")
    ramped = experiments.get(sqlite_db, running.id)
    traffic.write(sqlite_db, ramped, users=2000, first_user=2000, control=ArmBehaviour(up=0.6),
                  candidate=ArmBehaviour(up=0.6), ts=utcnow() + timedelta(seconds=1), seed=9)
    analysis = experiment.analyse(sqlite_db, running.id)
    satisfaction = analysis.metrics["satisfaction"]
    naive = satisfaction["candidate"] - satisfaction["control"]
    assert naive > 0.08  # the pooled arm values differ by the drift, not by the treatment
    assert satisfaction["strata"] == 2
    assert abs(satisfaction["difference"]) < 0.04 and satisfaction["ci"][0] < 0 < satisfaction["ci"][1]
    assert analysis.action == "keep_running"


def test_a_ramp_when_every_answer_gets_slower_is_no_latency_breach(sqlite_db):
    """Just after 10% -> 50% every answer is slower (load, a slow dependency), in both arms: 3% of control's
    requests are from after the ramp and 23% of the candidate's, so the pooled p95s are 100-odd ms against
    300-odd, and the latency guardrail rolled the candidate back. Within each phase the arms do not differ."""
    running = traffic.start(sqlite_db, share=0.1)
    fast, slow = ArmBehaviour(latency_ms=100), ArmBehaviour(latency_ms=250)
    traffic.write(sqlite_db, running, users=2000, requests_per_user=3, control=fast, candidate=fast,
                  ts=utcnow() - timedelta(hours=2))
    lifecycle.set_share(sqlite_db, running.id, 0.5, reason="ramp")
    traffic.write(sqlite_db, experiments.get(sqlite_db, running.id), users=120, requests_per_user=3,
                  first_user=2000, control=slow, candidate=slow, ts=utcnow() + timedelta(seconds=1), seed=9)
    analysis = experiment.analyse(sqlite_db, running.id)
    latency = analysis.metrics["latency_p95_ms"]
    assert latency["candidate"] - latency["control"] > 100, latency  # the pooled p95s, shown as they are
    assert latency["strata"] == 2
    assert abs(latency["difference"]) < 20 and latency["ci"][0] < 0 < latency["ci"][1], latency
    assert analysis.guardrails["results"]["latency_p95_ms"]["status"] == "ok", analysis.guardrails
    assert analysis.action != "roll_back", analysis.decision


def test_users_who_return_less_to_the_candidate_are_no_sample_ratio_mismatch(sqlite_db):
    """10% -> 50%; half of control's users come back after the ramp, a tenth of the candidate's. Whether a user
    returns is the treatment's doing, so the split is tested on users at their first request only: counting the
    returning ones made phase 2 1,750 control against 1,550 candidate users (p ~ 5e-4), a broken split that held
    the verdict."""
    running = traffic.start(sqlite_db, share=0.1)
    traffic.write(sqlite_db, running, users=5000, ts=utcnow() - timedelta(hours=2))
    lifecycle.set_share(sqlite_db, running.id, 0.5, reason="ramp")
    ramped = experiments.get(sqlite_db, running.id)
    rng = random.Random(3)

    def returns(user: str) -> bool:
        first_arm = assign_arm(running.salt, user, 0.1, has_candidate=True)
        return rng.random() < (0.1 if first_arm == "candidate" else 0.5)

    traffic.write(sqlite_db, ramped, users=5000, only=returns, ts=utcnow() + timedelta(seconds=1), seed=4)
    traffic.write(sqlite_db, ramped, users=1000, first_user=5000, ts=utcnow() + timedelta(seconds=2), seed=5)
    analysis = experiment.analyse(sqlite_db, running.id)
    assert not analysis.srm["mismatch"] and all(p["p_value"] > 0.001 for p in analysis.phases), analysis.srm
    first, second = analysis.phases
    assert sum(first["users"]) == 5000 and sum(second["users"]) == 1000  # the new users of each phase
    new_on_candidate = sum(assign_arm(running.salt, f"test-user-{n}", 0.5, has_candidate=True) == "candidate"
                           for n in range(5000, 6000))
    assert second["users"] == [1000 - new_on_candidate, new_on_candidate]
