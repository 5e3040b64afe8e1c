"""Every figure `abloop evaluate` prints, recomputed from the raw rows.

test_analysis.py checks what the analysis decides; this module checks the numbers beside the decision: each
metric's comparison, the per-arm sequences of the report's chart, the sample-ratio block, the reference tests,
the guardrails, the latency quantile and the timeline. Users are aggregated here straight from the stored rows
(not through experiment.collect), and each figure is the statistic of those users: scipy where it has the test,
otherwise the function of experiment.stats that tests/experiment/test_stats.py pins to scipy and gbstats.
The policy is not the default one (alpha 0.1, tuning 300), so a figure computed with a default instead of the
policy's setting differs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from scipy.stats import chisquare, ttest_ind
from sqlalchemy import delete, func, insert

from experiment import lifecycle, stats
from experiment.analysis import (
    FIXED_LABEL,
    SEQUENTIAL_METHOD,
    _arm_sequence,
    _json_ready,
    analyse,
    analyse_collected,
    empty,
    timeline,
)
from experiment.assignment import assign_arm, bucket
from experiment.collect import collect, collect_at
from experiment.decision import DEFAULT_GUARDRAILS, SRM_P, Guardrail, Policy
from experiment.metrics import METRICS, ArmUsers, PhaseCount, UserSums, satisfaction
from experiment.phases import Phase
from store import experiments
from store.models import AnswerScore, ExperimentEvent, Feedback, SearchEvent, new_id, utcnow
from tests.experiment import traffic
from tests.experiment.test_weekly import search_event
from tests.experiment.traffic import ArmBehaviour

POLICY = Policy(alpha=0.1, sequential_tuning=300.0, min_users_per_arm=50, min_signals_per_arm=20, cuped=False)
CONTROL = ArmBehaviour(up=0.45, rating_mean=3.0, feedback=0.7, error=0.02, fallback=0.03, latency_ms=100.0)
CANDIDATE = ArmBehaviour(up=0.6, rating_mean=3.4, feedback=0.6, error=0.01, fallback=0.01, latency_ms=140.0)


@pytest.fixture
def ramped(sqlite_db):
    """A 20% -> 50% ramp with new users in each phase, two requests each (every answer judged, some feedback
    a correction), three anonymous requests and one without timings."""
    running = traffic.start(sqlite_db, share=0.2)
    traffic.write(sqlite_db, running, users=500, requests_per_user=2, control=CONTROL, candidate=CANDIDATE,
                  ts=utcnow() - timedelta(hours=2))
    lifecycle.set_share(sqlite_db, running.id, 0.5, reason="ramp")
    ramp = experiments.get(sqlite_db, running.id)
    traffic.write(sqlite_db, ramp, users=500, first_user=500, requests_per_user=2, control=CONTROL,
                  candidate=CANDIDATE, ts=utcnow() + timedelta(seconds=1), seed=3)
    with sqlite_db.session() as session:
        rows = session.query(Feedback).order_by(Feedback.ts, Feedback.id).all()
        for row in rows[::5]:
            row.corrected_answer = "Answer: a better one"
        scored = session.query(SearchEvent.id, SearchEvent.arm).filter(SearchEvent.status == "ok").all()
        session.execute(insert(AnswerScore), [
            {"id": new_id(), "event_id": event_id, "method": "judge", "score": (0.7 if arm == "candidate" else 0.5)
             + 0.1 * (n % 3), "created_at": utcnow()} for n, (event_id, arm) in enumerate(scored)])
        session.execute(insert(SearchEvent), [
            {"id": new_id(), "ts": utcnow(), "user_id": None, "experiment_id": running.id, "arm": "control",
             "served_arm": "control", "query": "q", "messages": [], "retrieved": {}, "status": "ok",
             "timings": {"total": 5.0}} for _ in range(3)])
        session.execute(insert(SearchEvent), [  # a request that logged no timings
            {"id": new_id(), "ts": utcnow(), "user_id": "no-timings", "experiment_id": running.id, "arm": "control",
             "served_arm": "control", "query": "q", "messages": [], "retrieved": {}, "status": "ok", "timings": None,
             "tokens_in": 10, "tokens_out": 5}])
    return sqlite_db, running.id


def _close(got, want, rel: float = 1e-9) -> bool:
    """Equal structure, floats equal to `rel` (nan equals nan): pytest.approx does not nest."""
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(_close(got[k], want[k], rel) for k in want)
    if isinstance(want, list | tuple):
        return (isinstance(got, list | tuple) and len(got) == len(want)
                and all(_close(g, w, rel) for g, w in zip(got, want, strict=True)))
    if isinstance(want, float) and not isinstance(want, bool):
        return isinstance(got, float) and (math.isclose(got, want, rel_tol=rel, abs_tol=1e-12)
                                           or (math.isnan(got) and math.isnan(want)))
    return type(got) is type(want) and got == want


def _users(db, experiment_id: str) -> dict[str, dict]:
    """Per user, from the rows: arm, phase of the first request, the sums of every metric, and latencies."""
    with db.session() as session:
        ramp_at = max(e.ts for e in experiments.list_events(db, experiment_id))
        events = session.query(SearchEvent.id, SearchEvent.ts, SearchEvent.user_id, SearchEvent.arm,
                               SearchEvent.status, SearchEvent.timings).filter(
            SearchEvent.experiment_id == experiment_id, SearchEvent.user_id.is_not(None)).all()
        feedback = session.query(Feedback.event_id, Feedback.thumbs, Feedback.rating,
                                 Feedback.corrected_answer).all()
        judged = session.query(AnswerScore.event_id, AnswerScore.score).filter(AnswerScore.method == "judge").all()
    users: dict[str, dict] = {}
    owner = {}
    for event_id, ts, user, arm, status, timings in sorted(events, key=lambda e: e[1]):
        row = users.setdefault(user, {"arm": arm, "phase": int(ts >= ramp_at), "sums": defaultdict(float),
                                      "latencies": []})
        assert row["arm"] == arm  # new users in each phase: nobody moves between arms
        sums = row["sums"]
        sums["requests"] += 1
        sums["errors"] += status == "error"
        sums["fallbacks"] += status == "fallback"
        sums["tokens_in"] += 10  # what the traffic helper writes on every event
        sums["tokens_out"] += 5
        row["latencies"] += [timings["total"]] if timings else []
        owner[event_id] = user
    for event_id, thumbs, rating, corrected in feedback:
        sums = users[owner[event_id]]["sums"]
        sums["corrections"] += corrected is not None
        sums["feedback_events"] += 1  # the traffic helper writes at most one feedback row per event
        sums["thumbs"] += 1
        sums["thumbs_up"] += thumbs == "up"
        sums["ratings"] += 1
        sums["rating_sum"] += rating
        sums["satisfaction_sum"] += ((thumbs == "up") + (rating - 1) / 4) / 2
        sums["satisfaction_n"] += 1
    for event_id, score in judged:
        users[owner[event_id]]["sums"]["judge_sum"] += score
        users[owner[event_id]]["sums"]["judge_n"] += 1
    # Compared: not a first-phase user whose bucket the ramp moved (20% -> 50%: buckets 2000..4999),
    # whether or not they came back (DESIGN's bucket rule: sha256 of "salt:user", mod 10,000).
    salt = experiments.get(db, experiment_id).salt
    for user, row in users.items():
        moved = 2000 <= int(hashlib.sha256(f"{salt}:{user}".encode()).hexdigest(), 16) % 10_000 < 5000
        row["compared"] = not (row["phase"] == 0 and moved)
    return users


def _compared(users: dict) -> dict[str, dict]:
    return {user: row for user, row in users.items() if row["compared"]}


def _column(users: dict, arm: str, column: str, phase: int | None = None) -> np.ndarray:
    return np.array([u["sums"][column] for u in _compared(users).values()
                     if u["arm"] == arm and (phase is None or u["phase"] == phase)], dtype=float)


def _expected_comparison(users: dict, name: str) -> stats.Comparison | None:
    metric = METRICS[name]
    parts, sizes = [], []
    for phase in (0, 1):
        part = stats.compare_ratio(*(_column(users, arm, column, phase) for arm in ("control", "candidate")
                                     for column in (metric.numerator, metric.denominator)),
                                   alpha=POLICY.alpha, tuning=POLICY.sequential_tuning)
        if part is not None:
            parts.append(part)
            sizes.append(sum(1 for row in users.values() if row["phase"] == phase))  # left-out users included
    if not parts:
        return None
    pooled = [stats.ratio_estimate(_column(users, arm, metric.numerator), _column(users, arm, metric.denominator))
              for arm in ("control", "candidate")]
    return stats.stratified(parts, control=pooled[0].value, candidate=pooled[1].value, alpha=POLICY.alpha,
                            tuning=POLICY.sequential_tuning, sizes=sizes)


def test_each_metric_is_the_within_phase_comparison_of_its_users(ramped):
    db, experiment_id = ramped
    analysis = analyse(db, experiment_id, POLICY)
    users = _users(db, experiment_id)
    assert set(analysis.metrics) == {*METRICS, "latency_p95_ms"}
    for name, metric in METRICS.items():
        expected, got = _expected_comparison(users, name), analysis.metrics[name]
        if expected is None:
            assert got is None, name
            continue
        chance = expected.chance_to_win if metric.higher_is_better else 1 - expected.chance_to_win
        assert _close(got, {
            "higher_is_better": metric.higher_is_better, "control": expected.control,
            "candidate": expected.candidate, "difference": expected.difference, "relative": expected.relative,
            "ci": list(expected.sequential_ci), "p_value": expected.sequential_p_value, "chance_to_win": chance,
            "std_error": expected.std_error,
            "fixed_horizon": {"ci": list(expected.fixed_ci), "p_value": expected.fixed_p_value},
            "cuped": None, "users": list(expected.users), "strata": 2,
            "responders": [int(np.count_nonzero(_column(users, arm, metric.denominator)))
                           for arm in ("control", "candidate")],
            "numerator_users": [int(np.count_nonzero(_column(users, arm, metric.numerator)))
                                for arm in ("control", "candidate")]}, rel=1e-9), name
    # Lower is better for errors: the candidate's fewer errors make its chance to win high.
    assert analysis.metrics["error_rate"]["chance_to_win"] > 0.5 > analysis.metrics["error_rate"]["difference"]
    assert analysis.metrics["correction_rate"]["control"] > 0 and analysis.metrics["judge_score"]["difference"] > 0
    assert analysis.metrics["answer_score"] is None  # no answer was scored for grounding


def test_the_per_arm_summary_is_the_totals_of_its_users(ramped):
    db, experiment_id = ramped
    analysis = analyse(db, experiment_id, POLICY)
    users = _users(db, experiment_id)
    for arm in ("control", "candidate"):
        total = {column: _column(users, arm, column).sum() for column in users[next(iter(users))]["sums"]}
        latencies = [ms for u in _compared(users).values() if u["arm"] == arm for ms in u["latencies"]]
        assert _close(analysis.arms[arm], {
            "users": sum(1 for u in _compared(users).values() if u["arm"] == arm), "requests": int(total["requests"]),
            "thumbs": int(total["thumbs"]), "thumbs_up": int(total["thumbs_up"]),
            "thumbs_up_rate": total["thumbs_up"] / total["thumbs"],
            "thumbs_up_per_request": total["thumbs_up"] / total["requests"],
            "feedback_rate": total["feedback_events"] / total["requests"],
            "satisfaction": total["satisfaction_sum"] / total["satisfaction_n"], "ratings": int(total["ratings"]),
            "mean_rating": total["rating_sum"] / total["ratings"],
            "correction_rate": total["corrections"] / total["requests"],
            "error_rate": total["errors"] / total["requests"], "fallback_rate": total["fallbacks"] / total["requests"],
            "answer_score": None, "answers_scored": 0, "judge_score": total["judge_sum"] / total["judge_n"],
            "latency_p50_ms": float(np.percentile(latencies, 50)),
            "latency_p95_ms": float(np.percentile(latencies, 95)),
            "tokens_in": int(total["tokens_in"]), "tokens_out": int(total["tokens_out"])}, rel=1e-12), arm
        assert 0 < total["corrections"] < total["feedback_events"] and total["errors"] and total["fallbacks"]


def test_one_phase_is_one_comparison_at_the_policys_level(sqlite_db):
    running = traffic.start(sqlite_db)
    traffic.write(sqlite_db, running, users=400, control=CONTROL, candidate=CANDIDATE)
    users = _users(sqlite_db, running.id)
    expected = stats.compare_ratio(*(_column(users, arm, column) for arm in ("control", "candidate")
                                     for column in ("satisfaction_sum", "satisfaction_n")),
                                   alpha=POLICY.alpha, tuning=POLICY.sequential_tuning)
    got = analyse(sqlite_db, running.id, POLICY).metrics["satisfaction"]
    assert got["strata"] == 1 and _close(got["ci"], list(expected.sequential_ci), rel=1e-12)
    assert _close(got["fixed_horizon"], {"ci": list(expected.fixed_ci), "p_value": expected.fixed_p_value}, rel=1e-12)


def test_the_primary_block_and_its_per_arm_always_valid_sequences(ramped):
    db, experiment_id = ramped
    analysis = analyse(db, experiment_id, POLICY)
    users = _users(db, experiment_id)
    primary = analysis.primary
    assert analysis.primary_metric == primary["metric"] == "satisfaction"
    assert primary["label"] == METRICS["satisfaction"].label
    assert primary["difference"] == analysis.metrics["satisfaction"]["difference"]
    for arm in ("control", "candidate"):
        estimate = stats.ratio_estimate(_column(users, arm, "satisfaction_sum"), _column(users, arm, "satisfaction_n"))
        ci, _p = stats.sequential_interval(estimate.value, estimate.variance, estimate.users, POLICY.alpha,
                                           POLICY.sequential_tuning)
        assert _close(primary["arms"][arm], {"value": estimate.value, "ci": list(ci),
                                                      "users": estimate.users}, rel=1e-12)
        assert estimate.users == analysis.arms[arm]["users"]


def _arm(numerators: list[float], denominators: list[float]) -> ArmUsers:
    columns = {"satisfaction_sum": np.array(numerators, dtype=float),
               "satisfaction_n": np.array(denominators, dtype=float)}
    return ArmUsers(user_ids=[f"u{n}" for n in range(len(numerators))], columns=columns,
                    latencies_ms=np.array([]), strata=np.zeros(len(numerators), dtype=int))


def test_an_arm_sequence_without_a_usable_variance_has_a_value_and_no_interval():
    assert _arm_sequence(_arm([1.0], [1.0]), "satisfaction", POLICY) == {"value": 1.0, "ci": None, "users": 1}
    undefined = _arm_sequence(_arm([0.0, 0.0], [0.0, 0.0]), "satisfaction", POLICY)  # nobody gave feedback
    assert math.isnan(undefined["value"]) and undefined["ci"] is None and undefined["users"] == 2
    pair = _arm_sequence(_arm([1.0, 0.0], [1.0, 1.0]), "satisfaction", POLICY)
    assert pair["users"] == 2 and pair["ci"] is not None and pair["ci"][0] < 0.5 < pair["ci"][1]
    defined = _arm_sequence(_arm([1.0, 0.0, 2.0], [1.0, 1.0, 2.0]), "satisfaction", POLICY)
    estimate = stats.ratio_estimate([1.0, 0.0, 2.0], [1.0, 1.0, 2.0])
    ci, _p = stats.sequential_interval(0.75, estimate.variance, 3, POLICY.alpha, POLICY.sequential_tuning)
    assert _close(defined, {"value": 0.75, "ci": list(ci), "users": 3}, rel=1e-12)


def test_the_sample_ratio_block_is_the_chi_square_of_each_phase(ramped):
    db, experiment_id = ramped
    analysis = analyse(db, experiment_id, POLICY)
    users = _users(db, experiment_id)
    counts = [[sum(1 for u in users.values() if u["phase"] == phase and u["arm"] == arm)
               for arm in ("control", "candidate")] for phase in (0, 1)]
    p_values = [chisquare(counts[0], sum(counts[0]) * np.array([0.8, 0.2])).pvalue,
                chisquare(counts[1], sum(counts[1]) * np.array([0.5, 0.5])).pvalue]
    srm = analysis.srm
    assert [p["users"] for p in analysis.phases] == counts
    assert [p["p_value"] for p in analysis.phases] == pytest.approx(p_values, rel=1e-12)
    assert _close([p["expected"] for p in analysis.phases],
                  [[sum(counts[0]) * 0.8, sum(counts[0]) * 0.2], [sum(counts[1]) * 0.5, sum(counts[1]) * 0.5]])
    assert [p["share"] for p in analysis.phases] == [0.2, 0.5]
    assert analysis.phases[0]["end"] == analysis.phases[1]["start"] and analysis.phases[1]["end"] is None
    assert analysis.phases[1]["reason"] == "ramp"
    assert srm["observed"] == [counts[0][0] + counts[1][0], counts[0][1] + counts[1][1]]
    assert _close(srm["expected"], [sum(counts[0]) * 0.8 + sum(counts[1]) * 0.5,
                                             sum(counts[0]) * 0.2 + sum(counts[1]) * 0.5])
    assert _close(srm["p_value"], min(p_values), rel=1e-12)
    assert srm["threshold"] == SRM_P and srm["mismatch"] is False and "per phase" in srm["note"]
    assert srm["phases"] == analysis.phases


def test_a_mismatch_in_the_second_phase_is_named_with_its_share(sqlite_db):
    running = traffic.start(sqlite_db, share=0.2)
    traffic.write(sqlite_db, running, users=600, ts=utcnow() - timedelta(hours=2))
    lifecycle.set_share(sqlite_db, running.id, 0.5, reason="ramp")
    # The proxy kept bucketing at 20% after the experiment said 50%.
    traffic.write(sqlite_db, running, users=2000, first_user=600, share=0.2, ts=utcnow() + timedelta(seconds=1))
    analysis = analyse(sqlite_db, running.id, POLICY)
    assert [p["mismatch"] for p in analysis.phases] == [False, True]
    assert analysis.srm["mismatch"] and analysis.srm["p_value"] == analysis.phases[1]["p_value"]
    assert "sample ratio mismatch in phase 2 (share 50%, p=" in analysis.decision["reason"]
    lifecycle.set_share(sqlite_db, running.id, 0.8, reason="nobody has searched since")
    with sqlite_db.session() as session:  # after the last request (the helper wrote those a second ahead)
        session.query(ExperimentEvent).filter(ExperimentEvent.to_share == 0.8).update(
            {ExperimentEvent.ts: utcnow() + timedelta(hours=1)})
    empty_phase = analyse(sqlite_db, running.id, POLICY).phases[2]
    assert (empty_phase["users"], empty_phase["expected"], empty_phase["p_value"]) == ([0, 0], None, None)


def test_the_sample_ratio_expects_the_share_the_buckets_give(sqlite_db):
    running = traffic.start(sqlite_db, share=1 / 3)  # buckets 0..3333: 3334 of 10000, not a third
    traffic.write(sqlite_db, running, users=900)
    phase = analyse(sqlite_db, running.id, POLICY).phases[0]
    total = sum(phase["users"])
    assert total == 900 and phase["share"] == 1 / 3
    assert _close(phase["expected"], [total * 0.6666, total * 0.3334], rel=1e-12)
    assert _close(phase["p_value"], chisquare(phase["users"], [total * 0.6666, total * 0.3334]).pvalue, rel=1e-12)


def test_a_share_finer_than_a_bucket_is_no_mismatch_when_its_bucket_fills(sqlite_db):
    """0.00001 of the traffic is one bucket, a ten-thousandth: expecting the configured share would call four
    candidate users in 40,000 a mismatch (p ~ 1e-8) when they are just what the proxy sends."""
    running = traffic.start(sqlite_db, share=0.00001)
    collected = collect(sqlite_db, running.id)
    collected.phases = [PhaseCount(Phase(0, 0.00001, running.started_at, None, "start"), (39_996, 4))]
    analysis = analyse_collected(collected, POLICY)
    assert analysis.phases[0]["expected"] == pytest.approx([39_996, 4])
    assert analysis.phases[0]["p_value"] == pytest.approx(1.0) and analysis.srm["mismatch"] is False
    assert chisquare([39_996, 4], [39_999.6, 0.4]).pvalue < SRM_P  # what the configured share would have said


def test_the_fixed_horizon_reference_blocks_are_scipys_on_the_users(ramped):
    db, experiment_id = ramped
    analysis = analyse(db, experiment_id, POLICY)
    users = _users(db, experiment_id)
    means = {arm: [u["sums"]["rating_sum"] / u["sums"]["ratings"] for u in _compared(users).values()
                   if u["arm"] == arm and u["sums"]["ratings"]] for arm in ("control", "candidate")}
    assert 0 < len(means["control"]) < sum(1 for u in users.values() if u["arm"] == "control")  # some never rated
    rating = analysis.rating
    assert _close(rating["control"], np.mean(means["control"]), rel=1e-12)
    assert _close(rating["candidate"], np.mean(means["candidate"]), rel=1e-12)
    assert _close(rating["p_value"], ttest_ind(means["candidate"], means["control"], equal_var=False).pvalue,
                                              rel=1e-9)
    assert rating["label"] == FIXED_LABEL
    thumbs = analysis.thumbs_up
    for arm in ("control", "candidate"):
        up, given = _column(users, arm, "thumbs_up").sum(), _column(users, arm, "thumbs").sum()
        assert _close(thumbs[arm], up / given, rel=1e-12)
    assert thumbs["label"] == FIXED_LABEL


def _latencies(users: dict, arm: str, phase: int | None = None) -> tuple[list[float], list[str]]:
    """The compared requests' latencies of an arm (or of its users first seen in `phase`), each with its user."""
    rows = [(ms, user) for user, u in _compared(users).items() if u["arm"] == arm and phase in (None, u["phase"])
            for ms in u["latencies"]]
    return [ms for ms, _user in rows], [user for _ms, user in rows]


def test_latency_p95_is_compared_on_requests_within_each_phase_and_guards_the_rollout(ramped):
    db, experiment_id = ramped
    analysis = analyse(db, experiment_id, POLICY)
    users = _users(db, experiment_id)

    def compared(phase: int | None) -> stats.Comparison | None:
        (a, a_users), (b, b_users) = (_latencies(users, arm, phase) for arm in ("control", "candidate"))
        return stats.compare_quantile(a, b, 0.95, alpha=POLICY.alpha, tuning=POLICY.sequential_tuning,
                                      control_clusters=a_users, candidate_clusters=b_users)

    pooled, parts = compared(None), [compared(0), compared(1)]
    sizes = [sum(1 for row in users.values() if row["phase"] == phase) for phase in (0, 1)]  # left-out included
    want = stats.stratified(parts, control=pooled.control, candidate=pooled.candidate, alpha=POLICY.alpha,
                            tuning=POLICY.sequential_tuning, sizes=sizes)
    got = analysis.metrics["latency_p95_ms"]
    assert _close(got, {"higher_is_better": False, "control": pooled.control, "candidate": pooled.candidate,
                        "difference": want.difference, "relative": want.difference / pooled.control,
                        "ci": list(want.sequential_ci), "p_value": want.sequential_p_value,
                        "std_error": want.std_error, "unit": "requests", "strata": 2}, rel=1e-12)
    assert _close(pooled.control, np.quantile(_latencies(users, "control")[0], 0.95))
    # 40% slower at p95 is within the default 50% margin; a 20% margin is breached and rolls back.
    assert analysis.guardrails["results"]["latency_p95_ms"]["status"] == "ok"
    strict = Policy(**{**POLICY.__dict__, "guardrails": (Guardrail("latency_p95_ms", 0.2, relative=True),)})
    rolled = analyse(db, experiment_id, strict)
    assert rolled.guardrails["breached"] and rolled.guardrails["breached"][0].startswith("latency_p95_ms")
    assert rolled.action == "roll_back" and "guardrail breached: latency_p95_ms" in rolled.decision["reason"]


def test_guardrail_results_carry_their_comparison_and_wait_for_the_minimum_sample(ramped):
    db, experiment_id = ramped
    analysis = analyse(db, experiment_id, POLICY)
    smallest = min(analysis.arms[arm]["users"] for arm in ("control", "candidate"))
    at_minimum = analyse(db, experiment_id, Policy(**{**POLICY.__dict__, "min_users_per_arm": smallest}))
    guardrails = at_minimum.guardrails
    assert guardrails["checked"] is True and guardrails["breached"] == []
    assert set(guardrails["results"]) == {g.metric for g in DEFAULT_GUARDRAILS}
    assert guardrails["results"]["answer_score"] == {"status": "no data"}  # no answer was scored
    for guardrail in DEFAULT_GUARDRAILS:
        if guardrail.metric == "answer_score":
            continue
        result, comparison = guardrails["results"][guardrail.metric], at_minimum.metrics[guardrail.metric]
        margin = guardrail.margin * abs(comparison["control"]) if guardrail.relative else guardrail.margin
        assert _close(result, {"status": "ok", "margin": margin, "relative_margin": guardrail.relative,
                                        "difference": comparison["difference"], "ci": comparison["ci"]}), result
    assert "one-sided" in guardrails["note"]
    no_data_first = Policy(**{**POLICY.__dict__, "guardrails": (Guardrail("answer_score", 0.05),
                                                                 Guardrail("error_rate", 0.02))})
    assert list(analyse(db, experiment_id, no_data_first).guardrails["results"]) == ["answer_score", "error_rate"]
    short = analyse(db, experiment_id, Policy(**{**POLICY.__dict__, "min_users_per_arm": smallest + 1}))
    assert short.guardrails["checked"] is False
    assert {r["status"] for r in short.guardrails["results"].values()} == {"waiting for sample", "no data"}


def test_the_rest_of_the_analysis_names_its_experiment_method_and_policy(ramped):
    db, experiment_id = ramped
    analysis = analyse(db, experiment_id, POLICY)
    assert (analysis.experiment_id, analysis.status, analysis.candidate_share) == (experiment_id, "running", 0.5)
    left_out = [user for user, row in _users(db, experiment_id).items() if not row["compared"]]
    assert len(left_out) > 100  # about 30% of the first phase's 500 users, none of whom came back
    assert analysis.assignment == {
        "rule": "first assignment", "users_in_both_arms": 0, "requests_excluded": 0, "anonymous_requests": 3,
        "users_left_out": len(left_out), "requests_left_out": 2 * len(left_out),
        "note": "users whose bucket a later share change moves to the other arm are left out, whether or not they "
                "came back"}
    assert analysis.sequential == {"method": SEQUENTIAL_METHOD, "alpha": 0.1, "tuning_users": 300.0}
    assert analysis.policy == POLICY.to_dict()
    starved = analyse(db, experiment_id, Policy(**{**POLICY.__dict__, "min_signals_per_arm": 10_000}))
    assert starved.action == "not_enough_data"
    assert starved.decision["reason"].startswith("satisfaction observations per arm [")
    assert analysis.to_dict()["policy"]["alpha"] == 0.1


def test_cuped_is_off_when_the_policy_says_so_even_with_a_pre_period_collected(sqlite_db):
    """bench/stats_calibration.py calls analyse_collected with its own policy on data collected with covariates."""
    running = traffic.start(sqlite_db)
    before = experiments.get(sqlite_db, running.id).started_at - timedelta(days=2)
    traffic.write(sqlite_db, running, users=300, requests_per_user=2, propensity_sd=0.3, seed=7, ts=before)
    with sqlite_db.session() as session:
        session.query(SearchEvent).filter(SearchEvent.ts < running.started_at).update(
            {SearchEvent.experiment_id: "an-older-experiment"})
    traffic.write(sqlite_db, running, users=300, requests_per_user=2, propensity_sd=0.3, seed=7)
    collected = collect(sqlite_db, running.id, cuped_lookback_days=14)
    assert collected.arms["candidate"].pre  # the covariates are there
    assert analyse_collected(collected, POLICY).metrics["satisfaction"]["cuped"] is None
    with_cuped = analyse_collected(collected, Policy(**{**POLICY.__dict__, "cuped": True}))
    assert with_cuped.metrics["satisfaction"]["cuped"] is not None
    # The history is 2 days old: the policy's lookback decides whether it is read.
    assert analyse(sqlite_db, running.id, Policy(cuped_lookback_days=3)).metrics["satisfaction"]["cuped"]
    assert analyse(sqlite_db, running.id, Policy(cuped_lookback_days=1)).metrics["satisfaction"]["cuped"] is None


def _own_history(requests: list[tuple]) -> dict[str, float]:
    """A user's pre-period value of the feedback metrics, from (thumbs, rating) per request (None, None: none)."""
    given = [(thumbs, rating) for thumbs, rating in requests if thumbs]  # the traffic helper gives both or neither
    ups = sum(thumbs == "up" for thumbs, _rating in given)
    return {"thumbs_up_per_request": ups / len(requests),
            "thumbs_up_rate": ups / len(given) if given else math.nan,
            "mean_rating": float(np.mean([rating for _thumbs, rating in given])) if given else math.nan,
            "satisfaction": float(np.mean([((t == "up") + (r - 1) / 4) / 2 for t, r in given])) if given else math.nan}


def test_the_pre_period_covariate_is_each_users_own_history_within_the_lookback(db):
    running = traffic.start(db)
    started = experiments.get(db, running.id).started_at
    old = traffic.ArmBehaviour(up=0.5, rating_mean=3.0, feedback=0.7)
    # users 0..199 searched 2 days before the experiment; users 100..299 also 20 days before (outside 14 days).
    traffic.write(db, running, users=200, requests_per_user=3, control=old, candidate=old, seed=4,
                  ts=started - timedelta(days=2), prefix="u")
    traffic.write(db, running, users=200, first_user=100, requests_per_user=3, control=old, candidate=old,
                  seed=5, ts=started - timedelta(days=20), prefix="u")
    step = timedelta(microseconds=10)  # the helper's first request comes one step after `ts`
    traffic.write(db, running, users=1, first_user=299, control=old, candidate=old, seed=8,
                  ts=started - timedelta(days=14) - step, prefix="u")  # exactly at the start of the window
    with db.session() as session:
        session.query(SearchEvent).filter(SearchEvent.ts < started).update({SearchEvent.experiment_id: "older"})
        history = session.query(SearchEvent.id, SearchEvent.user_id, SearchEvent.ts, Feedback.thumbs,
                                Feedback.rating).outerjoin(Feedback, Feedback.event_id == SearchEvent.id).filter(
            SearchEvent.experiment_id == "older").all()
        # The older experiment's scoring flow graded a sample of its answers, some by both methods.
        scored = [(event_id, method, int(hashlib.sha256(f"{event_id}{method}".encode()).hexdigest(), 16) % 101 / 100)
                  for n, (event_id, *_rest) in enumerate(history) for method in ("grounding", "judge")
                  if n % (2 if method == "grounding" else 3) == 0]
        session.execute(insert(AnswerScore), [{"id": new_id(), "event_id": event_id, "method": method, "score": score}
                                              for event_id, method, score in scored])
    traffic.write(db, running, users=300, seed=6, prefix="u")
    collected = collect(db, running.id, cuped_lookback_days=14)
    within: dict[str, list] = defaultdict(list)  # user -> (thumbs, rating) of each request in the window
    scores_within: dict[tuple[str, str], list] = defaultdict(list)  # (user, method) -> the scores in the window
    score_of = {(event_id, method): score for event_id, method, score in scored}
    for event_id, user, ts, thumbs, rating in history:
        if ts >= started - timedelta(days=14):
            within[user].append((thumbs, rating))
            for method in ("grounding", "judge"):
                if (event_id, method) in score_of:
                    scores_within[user, method].append(score_of[event_id, method])
    for arm in ("control", "candidate"):
        ids = collected.arms[arm].user_ids
        for name in ("thumbs_up_per_request", "thumbs_up_rate", "mean_rating", "satisfaction"):
            want = [_own_history(within[user])[name] if within[user] else math.nan for user in ids]
            assert _close(collected.arms[arm].pre[name].tolist(), want, rel=1e-12), (arm, name)
        for name, method in (("answer_score", "grounding"), ("judge_score", "judge")):
            want = [float(np.mean(scores_within[user, method])) if scores_within[user, method] else math.nan
                    for user in ids]
            assert sum(not math.isnan(w) for w in want) > 20, (arm, name)
            assert _close(collected.arms[arm].pre[name].tolist(), want, rel=1e-12), (arm, name)
        assert np.isnan(collected.arms[arm].pre["satisfaction"][[200 <= int(u[2:]) < 299 for u in ids]]).all()
    last = next(arm for arm in ("control", "candidate") if "u-299" in collected.arms[arm].user_ids)
    assert collected.arms[last].pre["thumbs_up_per_request"][collected.arms[last].user_ids.index("u-299")] in (0, 1)
    assert collect(db, running.id, cuped_lookback_days=0).arms["control"].pre == {}


def test_collect_reads_latencies_and_corrections_alike_on_both_backends(db):
    """collect asks the database for the total latency and whether a correction exists, not the JSON and the
    text: each shape a row can take reads the same on SQLite and PostgreSQL."""
    running = traffic.start(db, share=1.0)  # every user on the candidate arm
    timings = [{"total": 120}, {"total": 80.5, "llm": 70.0}, None, {}, {"llm": 3.0}, {"total": 0}]
    events = [search_event(running.id, utcnow(), f"u{n}", "q", arm="candidate", served_arm="candidate",
                           timings=shape) for n, shape in enumerate(timings)]
    corrections = ["Answer: better", "", None]  # an empty correction is still one given
    ratings = [4, None, None]  # a thumb without a rating adds nothing to the rating's sum
    with db.session() as session:
        session.execute(insert(SearchEvent), events)
        session.execute(insert(Feedback), [
            {"id": new_id(), "event_id": event["id"], "ts": utcnow(), "thumbs": "up", "corrected_answer": corrected,
             "rating": rating} for event, corrected, rating in zip(events, corrections, ratings, strict=False)])
    arm = collect(db, running.id).arms["candidate"]
    assert sorted(arm.latencies_ms.tolist()) == [0.0, 80.5, 120.0]
    assert sorted(arm.user_ids[n] for n in arm.latency_users) == ["u0", "u1", "u5"]
    assert dict(zip(arm.user_ids, arm.columns["corrections"].tolist(), strict=True)) == {
        "u0": 1.0, "u1": 1.0, "u2": 0.0, "u3": 0.0, "u4": 0.0, "u5": 0.0}
    rated = [dict(zip(arm.user_ids, arm.columns[column].tolist(), strict=True)) for column in ("rating_sum", "ratings")]
    assert rated == [{"u0": 4.0, "u1": 0.0, "u2": 0.0, "u3": 0.0, "u4": 0.0, "u5": 0.0},
                     {"u0": 1.0, "u1": 0.0, "u2": 0.0, "u3": 0.0, "u4": 0.0, "u5": 0.0}]


def test_reading_as_of_a_moment_includes_what_happened_at_that_moment(sqlite_db):
    running = traffic.start(sqlite_db)
    traffic.write(sqlite_db, running, users=20, control=ArmBehaviour(up=1.0), candidate=ArmBehaviour(up=1.0))
    with sqlite_db.session() as session:
        first = session.query(SearchEvent.ts).order_by(SearchEvent.ts).first()[0]
    collected = collect(sqlite_db, running.id, until=first)  # the first request and its feedback, same moment
    sums = [collected.arms[arm].total(column) for arm in ("control", "candidate") for column in ("requests", "thumbs")]
    assert sorted(sums) == [0, 0, 1, 1]


def test_collect_counts_feedback_only_on_a_counted_request_it_has_read_and_users_in_each_phase(db):
    """A phase counts the users first seen in it, by the arm of their first request (returning users, whose return
    the treatment decides, do not test the split); feedback on a crossover's other-arm request counts nowhere;
    feedback stamped before its own request (another writer's clock) waits for that request to be read."""
    running = traffic.start(db)
    arm_of = {u: assign_arm(running.salt, u, 0.5, has_candidate=True) for u in (f"u{n}" for n in range(40))}
    stay = [u for u in arm_of if not 5000 <= bucket(running.salt, u) < 6000]  # the 50% -> 60% ramp moves none
    a, b = [u for u in stay if arm_of[u] == "control"][:2]
    c = next(u for u in stay if arm_of[u] == "candidate")
    t0, t2 = utcnow() - timedelta(hours=2), utcnow() + timedelta(minutes=1)

    def event(user: str, arm: str, ts: datetime) -> dict:
        return search_event(running.id, ts, user, "q", arm=arm, served_arm=arm)

    events = [event(a, "control", t0), event(b, "control", t0 + timedelta(seconds=1)),
              event(c, "candidate", t0 + timedelta(seconds=2)), event(a, "control", t2),
              event(b, "candidate", t2 + timedelta(seconds=1)),  # a crossover, not by the ramp
              event(c, "candidate", t2 + timedelta(seconds=3))]
    with db.session() as session:
        session.execute(insert(SearchEvent), events)
        session.execute(insert(Feedback), [
            {"id": new_id(), "event_id": events[4]["id"], "ts": t2 + timedelta(seconds=2), "thumbs": "up"},
            {"id": new_id(), "event_id": events[5]["id"], "ts": t0 + timedelta(seconds=3), "thumbs": "up"}])
    lifecycle.set_share(db, running.id, 0.6, reason="ramp")
    now = collect(db, running.id)
    assert [count.users for count in now.phases] == [(2, 1), (0, 0)]  # all three came back; none was new
    assert (now.crossovers, now.excluded_requests, now.left_out_users) == (1, 1, 0)
    control, candidate = now.arms["control"], now.arms["candidate"]
    assert control.user_ids == [a, b] and candidate.user_ids == [c]  # in the order they first came
    assert control.columns["thumbs"].tolist() == [0, 0] and control.columns["requests"].tolist() == [2, 1]
    assert candidate.columns["thumbs"].tolist() == [1]
    then = t0 + timedelta(hours=1)  # c's feedback is stamped by now, its request is not yet made
    for collected in (collect(db, running.id, until=then), next(collect_at(db, running.id, [then]))):
        assert collected.arms["candidate"].columns["thumbs"].tolist() == [0]
        assert collected.arms["candidate"].columns["requests"].tolist() == [1]


def test_collect_gives_one_answer_whatever_order_the_database_returns_the_requests_in(db):
    """The events are put in time order after reading. Requests at the same microsecond are ordered by user and
    then by arm: the users first seen together are coded in the order of their ids, and a user's two requests at
    one moment, one on each arm, put them on the control arm (the other request is a crossover)."""
    running = traffic.start(db)
    moment = utcnow().replace(microsecond=0) - timedelta(minutes=5)
    together = ["u-b", "u-c", "u-a", "u-e", "u-f"]

    def event(user: str | None, arm: str, ts: datetime) -> dict:
        return search_event(running.id, ts, user, "q", arm=arm, served_arm=arm)

    arm_of = {u: assign_arm(running.salt, u, 0.5, has_candidate=True) for u in together}
    events = [event(u, arm_of[u], moment) for u in together]
    events += [event("u-d", "candidate", moment + timedelta(seconds=1)),
               event("u-d", "control", moment + timedelta(seconds=1)), event(None, "control", moment)]
    answers = []
    for order in (events, events[::-1]):
        with db.session() as session:
            session.execute(delete(Feedback))
            session.execute(delete(SearchEvent))
            session.execute(insert(SearchEvent), order)
            session.execute(insert(Feedback), [{"id": new_id(), "event_id": row["id"], "ts": row["ts"],
                                                "thumbs": "up"} for row in order])
        collected = collect(db, running.id)
        answers.append({arm: (users.user_ids, {c: v.tolist() for c, v in users.columns.items()})
                        for arm, users in collected.arms.items()})
        assert (collected.crossovers, collected.excluded_requests, collected.anonymous_requests) == (1, 1, 1)
    assert answers[0] == answers[1]
    for arm, (user_ids, _columns) in answers[0].items():
        assert user_ids == sorted(u for u in together if arm_of[u] == arm) + (["u-d"] if arm == "control" else [])
    assert answers[0]["control"][1]["thumbs"][-1] == 1  # u-d's feedback on the crossover counts nowhere


def test_the_users_left_out_by_a_ramp_are_those_on_its_edges_buckets_too(sqlite_db):
    """20% -> 50%: buckets 2000..4999 move from control to candidate. Under the tests' fixed salt these four users
    have buckets 1999, 2000, 4999 and 5000 (found by search), all first seen before the ramp."""
    running = traffic.start(sqlite_db, share=0.2)
    edges = {"u4333": 1999, "u5949": 2000, "u673": 4999, "u15633": 5000}
    assert {user: bucket(running.salt, user) for user in edges} == edges
    moment = utcnow() - timedelta(hours=1)
    with sqlite_db.session() as session:
        session.execute(insert(SearchEvent), [
            search_event(running.id, moment + timedelta(seconds=n), user, "q", arm=arm, served_arm=arm)
            for n, user in enumerate(edges)
            for arm in [assign_arm(running.salt, user, 0.2, has_candidate=True)]])
    lifecycle.set_share(sqlite_db, running.id, 0.5, reason="ramp")
    collected = collect(sqlite_db, running.id)
    assert collected.arms["candidate"].user_ids == ["u4333"] and collected.arms["control"].user_ids == ["u15633"]
    assert collected.left_out_users == 2


def test_feedback_and_scores_on_another_experiments_requests_stay_out(sqlite_db):
    running = traffic.start(sqlite_db, share=1.0)  # every user on the candidate arm
    moment = utcnow() - timedelta(minutes=5)
    mine, other = (search_event(experiment, moment, "u1", "q", arm="candidate", served_arm="candidate")
                   for experiment in (running.id, "another-experiment"))
    with sqlite_db.session() as session:
        session.execute(insert(SearchEvent), [mine, other])
        session.execute(insert(Feedback), [{"id": new_id(), "event_id": event["id"], "ts": moment, "thumbs": "up"}
                                           for event in (mine, other)])
        session.execute(insert(AnswerScore), [{"id": new_id(), "event_id": event["id"], "method": "judge",
                                               "score": 0.5, "created_at": moment} for event in (mine, other)])
    columns = collect(sqlite_db, running.id).arms["candidate"].columns
    assert [columns[c].tolist() for c in ("requests", "thumbs", "judge_n")] == [[1], [1], [1]]


def test_reading_at_several_moments_is_reading_at_each_one(db):
    """collect_at reads once and cuts in memory; collect(until=) cuts in the database. Feedback given an hour after
    its request and answers scored two hours after it count only from then; a moment without a zone is UTC, one
    with a zone is that instant."""
    running = traffic.start(db)
    start = utcnow().replace(microsecond=0) - timedelta(hours=3)
    traffic.write(db, running, users=20, ts=start, step=timedelta(seconds=10), control=ArmBehaviour(up=1.0),
                  candidate=ArmBehaviour(up=1.0))
    with db.session() as session:
        for row in session.query(Feedback).all():
            row.ts += timedelta(hours=1)
        session.execute(insert(AnswerScore), [
            {"id": new_id(), "event_id": event_id, "method": "judge", "score": 0.5,
             "created_at": start + timedelta(hours=2)} for (event_id,) in session.query(SearchEvent.id).all()])
    moments = [(start + timedelta(minutes=5)).replace(tzinfo=None),  # naive: UTC
               (start + timedelta(hours=1, minutes=2)).astimezone(timezone(timedelta(hours=1))),  # in CET
               start + timedelta(hours=2), None]  # the third: the very moment the answers were scored
    many = list(collect_at(db, running.id, moments))
    totals = [[sum(c.arms[arm].total(column) for arm in ("control", "candidate"))
               for column in ("requests", "thumbs", "judge_n")] for c in many]
    # At the second moment: feedback on the requests of the first 2 minutes.
    assert totals == [[20, 0, 0], [20, 12, 0], [20, 20, 20], [20, 20, 20]]
    for moment, collected in zip(moments, many, strict=True):
        alone = collect(db, running.id, until=moment)
        for arm in ("control", "candidate"):
            assert collected.arms[arm].user_ids == alone.arms[arm].user_ids
            assert {c: v.tolist() for c, v in collected.arms[arm].columns.items()} == {
                c: v.tolist() for c, v in alone.arms[arm].columns.items()}


def test_the_timeline_reanalyses_the_experiment_as_it_stood_at_evenly_spaced_moments(sqlite_db):
    running = traffic.start(sqlite_db)
    start = utcnow() - timedelta(hours=3)
    traffic.write(sqlite_db, running, users=300, control=CONTROL, candidate=CANDIDATE, ts=start,
                  step=timedelta(seconds=30))
    with sqlite_db.session() as session:
        first, last = session.query(func.min(SearchEvent.ts), func.max(SearchEvent.ts)).one()
    lifecycle.promote(sqlite_db, running.id, force=True, via="test")  # a report may chart an ended experiment
    series = timeline(sqlite_db, running.id, POLICY, points=4)
    step = (last - first) / 3
    assert [point["ts"] for point in series] == [(first + step * n).isoformat() for n in range(3)] + [last.isoformat()]
    for point in series:
        at = analyse(sqlite_db, running.id, POLICY, until=datetime.fromisoformat(point["ts"]))
        primary = at.primary or {}
        assert point == {"ts": point["ts"], "users": [at.arms[a]["users"] for a in ("control", "candidate")],
                         "share": at.phases[-1]["share"], "arms": primary.get("arms"),
                         "difference": primary.get("difference"), "ci": primary.get("ci"), "action": at.action}
    assert series[0]["users"] == [1, 0] or series[0]["users"] == [0, 1]  # only the first request had happened
    assert sum(series[-1]["users"]) == 300
    # With the policy's alpha, not the default: the last interval is the 90% one.
    assert series[-1]["ci"] == analyse(sqlite_db, running.id, POLICY).primary["ci"]
    assert series[-1]["ci"] != analyse(sqlite_db, running.id).primary["ci"]
    assert timeline(sqlite_db, "no-such-experiment-has-events", POLICY) == []
    assert len(timeline(sqlite_db, running.id)) == 12  # the report's default


def test_a_timeline_point_shows_the_share_and_the_scores_as_they_were_then(sqlite_db):
    """10% for an hour, then 50%; every answer scored an hour after the last request. A point before the ramp
    shows 10% and no score yet, not today's share and scores written since."""
    running = traffic.start(sqlite_db, share=0.1)
    start = utcnow() - timedelta(hours=2)
    traffic.write(sqlite_db, running, users=200, ts=start, step=timedelta(seconds=10))
    with sqlite_db.session() as session:
        session.get(ExperimentEvent, experiments.list_events(sqlite_db, running.id)[0].id).ts = start
        session.get(type(running), running.id).started_at = start
    lifecycle.set_share(sqlite_db, running.id, 0.5, reason="ramp")
    traffic.write(sqlite_db, experiments.get(sqlite_db, running.id), users=200, first_user=200)
    with sqlite_db.session() as session:
        events = session.query(SearchEvent.id).all()
        session.execute(insert(AnswerScore), [
            {"id": new_id(), "event_id": event_id, "method": "grounding", "score": 0.5,
             "created_at": utcnow() + timedelta(hours=1)} for (event_id,) in events])
    before_the_ramp = timeline(sqlite_db, running.id, POLICY, points=3)[0]
    assert before_the_ramp["share"] == 0.1
    then = analyse(sqlite_db, running.id, POLICY, until=datetime.fromisoformat(before_the_ramp["ts"]))
    assert then.arms["control"]["answers_scored"] == 0
    assert analyse(sqlite_db, running.id, POLICY).arms["control"]["answers_scored"] > 0


def test_the_reference_blocks_keep_their_keys_without_feedback(sqlite_db):
    """DESIGN: `thumbs_up.{control,candidate,lift,ci,p_value,chance_to_win}` and `rating.{lift,ci,p_value}`; with
    nobody's feedback yet they are there, null, so that a reader's `["thumbs_up"]["lift"]` never fails."""
    running = traffic.start(sqlite_db)
    quiet = ArmBehaviour(feedback=0.0)
    traffic.write(sqlite_db, running, users=200, control=quiet, candidate=quiet)
    printed = json.loads(json.dumps(analyse(sqlite_db, running.id, POLICY).to_dict()))
    assert printed["thumbs_up"] == {key: None for key in ("control", "candidate", "lift", "ci", "p_value",
                                                          "chance_to_win")} | {"label": FIXED_LABEL}
    assert printed["rating"] == {key: None for key in ("control", "candidate", "lift", "ci", "p_value")} | {
        "label": FIXED_LABEL}


def test_the_analysis_of_nothing_is_complete_and_says_why(sqlite_db):
    policy = Policy(alpha=0.2)
    assert empty("no running experiment", policy).to_dict() | {"evaluated_at": None} == {
        "experiment_id": None, "status": None, "candidate_share": None, "primary_metric": "satisfaction",
        "arms": {arm: {"users": 0, "requests": 0, "thumbs": 0, "ratings": 0} for arm in ("control", "candidate")},
        "srm": {"p_value": None, "mismatch": False, "observed": [0, 0], "expected": None, "phases": []},
        "thumbs_up": {"control": None, "candidate": None, "lift": None, "ci": None, "p_value": None,
                      "chance_to_win": None, "label": FIXED_LABEL},
        "rating": {"control": None, "candidate": None, "lift": None, "ci": None, "p_value": None, "label": FIXED_LABEL},
        "guardrails": {"breached": [], "checked": False, "results": {}},
        "decision": {"action": "not_enough_data", "reason": "no running experiment"}, "metrics": {},
        "primary": None, "phases": [], "assignment": {}, "sequential": {}, "policy": _json_ready(policy.to_dict()),
        "evaluated_at": None,
    }
    assert empty("nothing").policy == Policy().to_dict()
    nothing = analyse(sqlite_db, policy=policy)
    assert nothing.decision == {"action": "not_enough_data", "reason": "no running experiment"}
    assert nothing.policy == policy.to_dict()


def test_satisfaction_puts_thumbs_and_ratings_on_zero_to_one_and_averages_them():
    assert [satisfaction("up", None), satisfaction("down", None), satisfaction(None, 1), satisfaction(None, 5)] == [
        1.0, 0.0, 0.0, 1.0]
    assert satisfaction(None, 2) == 0.25 and satisfaction("up", 3) == 0.75 and satisfaction("down", 4) == 0.375
    assert satisfaction(None, None) is None and satisfaction("maybe", None) is None


def test_user_sums_count_what_each_row_carries():
    sums = UserSums()
    sums.add_event("u", "ok", None, None)  # a request that logged no token counts
    sums.add_event("u", "fallback", 7, 3)
    sums.add_feedback("u", None, None, True, first_on_event=True)
    sums.add_feedback("u", "up", 5, False, first_on_event=False)
    sums.add_score("u", "judge", 0.25)
    sums.add_score("u", "judge", 0.5)
    row = sums.rows["u"]
    assert {k: v for k, v in row.items() if v} == {
        "requests": 2, "fallbacks": 1, "tokens_in": 7, "tokens_out": 3, "feedback_events": 1, "thumbs_up": 1,
        "thumbs": 1, "rating_sum": 5, "ratings": 1, "corrections": 1, "satisfaction_sum": 1.0, "satisfaction_n": 1,
        "judge_sum": 0.75, "judge_n": 2}


def test_json_ready_turns_numpy_and_non_finite_numbers_into_json():
    value = {"a": (np.float32(0.5), np.int64(3), float("nan")), "b": [float("inf"), {"c": np.float32(-np.inf)}],
             "d": "text", "e": None, "f": 2}
    ready = _json_ready(value)
    assert ready == {"a": [0.5, 3, None], "b": [None, {"c": None}], "d": "text", "e": None, "f": 2}
    assert type(ready["a"][0]) is float and type(ready["a"][1]) is int
