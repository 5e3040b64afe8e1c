"""Every figure of the weekly bundle (experiment/weekly.py) recomputed from rows written by hand: the intervals,
the changes and their direction, the days of both weeks, answer scores and latency, the review lists with their
ties, the template table's order, the experiments of the two weeks and the simulated share. The statistics
themselves (ratio estimates, relative changes) are checked against gbstats in test_weekly.py; here the question is
whether each figure reaches the bundle from the right rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from statistics import NormalDist

import numpy as np
import pytest
from sqlalchemy import insert, update

from experiment import lifecycle
from experiment.metrics import METRICS
from experiment.report import SIMULATED_PREFIX
from experiment.stats import ratio_estimate, relative_change
from experiment.weekly import RATES, parse_week_ending, week_over_week
from store.models import AnswerScore, Feedback, PromptTemplate, SearchEvent, new_id, utcnow
from tests.experiment import traffic
from tests.experiment.test_weekly import WEEK_ENDING, WEEKS, per_user, search_event, two_weeks

Z95 = NormalDist().inv_cdf(0.975)
SIM_A, SIM_B = f"{SIMULATED_PREFIX}a", f"{SIMULATED_PREFIX}b"


def _at(week_start: datetime, day: int, hour: int = 12, minute: int = 0) -> datetime:
    return week_start + timedelta(days=day, hours=hour, minutes=minute)


@pytest.fixture
def ledger(sqlite_db):
    """Two experiments (the first promoted, the second running) and a handful of requests, each placed on purpose:
    last week three (one at the very first instant), this week eight (two anonymous, two by simulated users)."""
    first = traffic.start(sqlite_db, share=0.5)
    second = lifecycle.promote(sqlite_db, first.id, force=True, via="test")
    with sqlite_db.session() as session:
        session.add_all([PromptTemplate(id="tpl-2", name="Answer", version=1, system_prompt="s", template="{query}"),
                         PromptTemplate(id="tpl-1", name="beta", version=1, system_prompt="s", template="{query}"),
                         PromptTemplate(id="tpl-0", name="beta", version=2, system_prompt="s", template="{query}")])
    answer, beta, beta_2 = ({"prompt_template_id": template_id, "prompt_template_version": version}
                            for template_id, version in (("tpl-2", 1), ("tpl-1", 1), ("tpl-0", 2)))
    no_hits = {"retrieved": {}}
    last, this = WEEKS.last_start, WEEKS.this_start
    rows = {
        "L1": search_event(first.id, last, "u1", "q", timings={"total": 100.0}),
        "L2": search_event(first.id, _at(last, 2), "u2", "q", arm="candidate", status="error",
                           timings={"total": 300.0}),
        "L3": search_event(first.id, _at(last, 6, 23, 59), "u1", "q", **answer),
        "T1": search_event(second.id, _at(this, 0, 9), "u1", "q", timings={"total": 50.0}, tokens_out=7, **answer),
        "T2": search_event(second.id, _at(this, 0, 10), "u2", "Why?", arm="candidate", timings={"total": 150.0},
                     **no_hits),
        "T3": search_event(second.id, _at(this, 3), "u3", " why? ", arm="candidate", timings={"total": 250.0}),
        "T4": search_event(second.id, _at(this, 6, 22), None, "anon", **no_hits),
        "T5": search_event(second.id, _at(this, 6, 23), None, "anon", **no_hits),
        "T6": search_event(second.id, _at(this, 4), SIM_A, "q", **answer),
        "T7": search_event(second.id, _at(this, 4, 13), SIM_B, "q", **beta_2),
        "T8": search_event(second.id, _at(this, 5), "u4", "q", **beta),
    }
    ids = {name: row["id"] for name, row in rows.items()}

    def feedback(name: str, **fields) -> dict:
        return {"id": new_id(), "event_id": ids[name], "ts": rows[name]["ts"], "thumbs": None, "rating": None,
                **fields}

    def score(name: str, value: float, method: str = "grounding") -> dict:
        return {"id": new_id(), "event_id": ids[name], "method": method, "score": value, "created_at": utcnow()}

    with sqlite_db.session() as session:
        session.execute(insert(SearchEvent), list(rows.values()))
        session.execute(insert(Feedback), [
            feedback("L3", thumbs="up"), feedback("T1", thumbs="up"),
            feedback("T1", comment="thanks"),  # a second row on one request: one request with feedback
            feedback("T2", thumbs="down", comment="useless"),  # satisfaction 0, first of a tie
            feedback("T3", thumbs="down", rating=1),  # satisfaction 0 as well, asked later
            feedback("T6", thumbs="up"), feedback("T7", rating=2)])  # satisfaction 0.25: low enough to review
        session.execute(insert(AnswerScore), [
            score("T1", 0.9), score("T2", 0.5),  # 0.5 is not below LOW_SCORE
            score("T3", 0.2), score("T3", 0.0, method="heuristic"),  # an unknown method counts nowhere
            score("T4", 0.1),  # anonymous: reviewed, but no user's figure
            score("T7", 0.3)])
    return sqlite_db, ids, (first.id, second.id)


def test_rates_carry_a_normal_95_percent_interval_and_their_users(sqlite_db):
    two_weeks(sqlite_db, users=(60, 80))
    bundle = week_over_week(sqlite_db, WEEK_ENDING)
    checked = 0
    for group, figures in bundle["groups"].items():
        for week in ("last", "this"):
            for name in RATES:
                rate = figures[week][name]
                if rate["std_error"] is None:
                    assert rate["ci"] is None, (group, week, name)
                    continue
                value, half = rate["value"], Z95 * rate["std_error"]
                assert rate["ci"] == pytest.approx([value - half, value + half], rel=1e-12), (group, week, name)
                assert rate["users"] == figures[week]["users"], (group, week, name)
                checked += 1
    assert checked >= 24  # five defined rates (no answer scores here) in three groups and two weeks


def test_each_change_says_which_way_is_better(sqlite_db):
    two_weeks(sqlite_db, users=(60, 80))
    change = week_over_week(sqlite_db, WEEK_ENDING)["groups"]["overall"]["change"]
    assert {key: change[key]["higher_is_better"] for key in ("requests", "users", "errors", "fallbacks",
                                                              "latency_p95_ms")} == {
        "requests": None, "users": None, "errors": False, "fallbacks": False, "latency_p95_ms": False}
    assert {name: change[name]["higher_is_better"] for name in RATES} == {
        name: METRICS[name].higher_is_better for name in RATES}
    assert change["users"]["relative"] == pytest.approx(80 / 60 - 1)  # the first 60 came back, 20 are new


def test_a_template_compares_its_thumbs_up_with_its_own_last_week(sqlite_db):
    two_weeks(sqlite_db, users=(60, 80))
    with sqlite_db.session() as session:
        session.add(PromptTemplate(id="tpl-all", name="search", version=3, system_prompt="s", template="{query}"))
        session.execute(update(SearchEvent).values(prompt_template_id="tpl-all", prompt_template_version=3))
    (row,) = week_over_week(sqlite_db, WEEK_ENDING)["templates"]
    rates = {week: ratio_estimate(sums["thumbs_up"], sums["requests"]) for week, sums in (
        ("last", per_user(sqlite_db, WEEKS.last_start, WEEKS.this_start)),
        ("this", per_user(sqlite_db, WEEKS.this_start, WEEKS.end)))}
    expected = relative_change(rates["last"], rates["this"], 0.05)
    assert row["thumbs_up_change"].keys() == expected.keys()
    for key, value in expected.items():
        assert row["thumbs_up_change"][key] == pytest.approx(value, rel=1e-12), key
    assert (row["name"], row["version"], row["tokens_out_per_request"]) == ("search", 3, 5.0)


def test_the_weeks_and_their_days_are_read_from_the_right_rows(ledger):
    db, _ids, _experiments = ledger
    bundle = week_over_week(db, WEEK_ENDING)
    assert bundle["kind"] == "weekly" and bundle["anonymous_requests"] == {"last": 0, "this": 2}
    assert abs(datetime.fromisoformat(bundle["generated_at"]) - utcnow()) < timedelta(minutes=5)
    overall = bundle["groups"]["overall"]
    assert overall["last"]["requests"] == 3  # L1 at the first instant of last week counts
    assert (overall["this"]["requests"], overall["this"]["users"]) == (6, 6)
    assert overall["this"]["feedback_rate"]["value"] == pytest.approx(5 / 6)  # T1's two rows count once
    days = bundle["days"]
    assert [d["date"] for d in days["last"]] == ["2025-05-26", "2025-05-27", "2025-05-28", "2025-05-29",
                                                 "2025-05-30", "2025-05-31", "2025-06-01"]
    assert [d["requests"] for d in days["last"]] == [1, 0, 1, 0, 0, 0, 1]
    assert [d["requests"] for d in days["this"]] == [2, 0, 0, 1, 2, 1, 0]  # day 6 was anonymous only
    assert [d["users"] for d in days["this"]] == [2, 0, 0, 1, 2, 1, 0]
    assert days["this"][0]["thumbs_up_per_request"]["value"] == 0.5  # T1 up, T2 down
    assert days["this"][4]["thumbs_up_per_request"]["value"] == 0.5  # T6 up, T7 nothing
    by_now = week_over_week(db, now=datetime(2025, 6, 9, 7, tzinfo=UTC))  # a Monday morning run: last week
    assert by_now["week"] == bundle["week"]


def test_answer_scores_latency_and_a_vanished_rate_per_group(ledger):
    db, _ids, _experiments = ledger
    groups = week_over_week(db, WEEK_ENDING)["groups"]
    this = {name: groups[name]["this"] for name in ("overall", "control", "candidate")}
    # Grounding only, per user; the heuristic score and the anonymous request's score count nowhere.
    assert this["overall"]["answer_score"]["value"] == pytest.approx((0.9 + 0.5 + 0.2 + 0.3) / 4)
    assert this["control"]["answer_score"]["value"] == pytest.approx((0.9 + 0.3) / 2)
    assert this["candidate"]["answer_score"]["value"] == pytest.approx((0.5 + 0.2) / 2)
    latencies = [50.0, 150.0, 250.0, 90.0, 90.0, 90.0]  # the anonymous requests' are left out
    assert this["overall"]["latency_p50_ms"] == pytest.approx(np.percentile(latencies, 50))
    assert this["overall"]["latency_p95_ms"] == pytest.approx(np.percentile(latencies, 95))
    assert this["candidate"]["latency_p95_ms"] == pytest.approx(np.percentile([150.0, 250.0], 95))
    assert this["overall"]["tokens_out"] == 7 + 5 * 5
    # Errors went from one in three to none: no interval for an exact zero, the relative change still shown.
    assert groups["overall"]["change"]["error_rate"] == {"relative": -1.0, "higher_is_better": False}


def test_a_rate_cannot_fall_by_more_than_100_percent(ledger):
    db, _ids, _experiments = ledger
    change = week_over_week(db, WEEK_ENDING)["groups"]["overall"]["change"]["thumbs_up_per_request"]
    last, this = (per_user(db, *window) for window in ((WEEKS.last_start, WEEKS.this_start),
                                                          (WEEKS.this_start, WEEKS.end)))
    raw = relative_change(ratio_estimate(last["thumbs_up"], last["requests"]),
                          ratio_estimate(this["thumbs_up"], this["requests"]), 0.05)
    assert raw["ci"][0] < -1  # two users last week, six this week: the t interval is wide
    assert change["ci"] == [-1.0, pytest.approx(raw["ci"][1], rel=1e-12)]
    assert change["relative"] == pytest.approx(raw["relative"]) and change["users"] == raw["users"] == [2, 6]


def test_a_review_list_counts_requests_not_their_feedback_rows():
    from experiment.weekly import _Miss

    miss = _Miss()
    miss.add(0.0, "Why?", "e1", "control", True, thumbs="down")
    miss.add(0.0, "Why?", "e1", "control", True, rating=1)  # the same request's second low feedback row
    miss.add(0.25, "why?", "e2", "candidate", False, rating=2)
    assert (miss.events, miss.simulated_events, miss.worst, miss.event_id, miss.detail) == (
        2, 1, 0.0, "e1", {"thumbs": "down"})


def test_the_review_lists_keep_the_first_worst_event_and_what_it_was(ledger):
    db, ids, _experiments = ledger
    misses = week_over_week(db, WEEK_ENDING)["misses"]
    rated, low = misses["lowest_rated"]
    assert (rated["query"], rated["events"], rated["worst"], rated["event_id"]) == ("Why?", 2, 0.0, ids["T2"])
    assert (rated["arm"], rated["thumbs"], rated["rating"], rated["comment"], rated["corrected_answer"]) == (
        "candidate", "down", None, "useless", None)
    assert rated["status"] == "ok" and rated["ts"].startswith("2025-06-02") and rated["answer"] == "an answer"
    assert (low["query"], low["worst"], low["rating"], low["thumbs"], low["events"], low["simulated_events"]) == (
        "q", 0.25, 2, None, 1, 1)
    assert [(m["query"], m["events"], m["simulated_events"], m["worst"], m["event_id"], m["arm"], m["method"])
            for m in misses["lowest_score"]] == [
        ("anon", 1, 0, 0.1, ids["T4"], "control", "grounding"),
        (" why? ", 1, 0, 0.2, ids["T3"], "candidate", "grounding"),  # T2's 0.5 is not below 0.5
        ("q", 1, 1, 0.3, ids["T7"], "control", "grounding")]
    assert [(m["query"], m["events"], m["worst"], m["event_id"]) for m in misses["no_hits"]] == [
        ("anon", 2, None, ids["T4"]), ("Why?", 1, None, ids["T2"])]
    assert misses["no_hits"][0]["ts"].startswith("2025-06-08") and misses["no_hits"][1]["arm"] == "candidate"


def test_templates_are_ordered_by_traffic_then_name_then_version(ledger):
    db, _ids, _experiments = ledger
    templates = week_over_week(db, WEEK_ENDING)["templates"]
    # Two requests each for no template and "Answer" (the unnamed first), one for each version of "beta".
    assert [(t["name"], t["version"], t["template_id"], t["requests"]) for t in templates] == [
        (None, None, None, 2), ("Answer", 1, "tpl-2", 2), ("beta", 1, "tpl-1", 1), ("beta", 2, "tpl-0", 1)]
    answer = templates[1]
    assert answer["tokens_out_per_request"] == 6.0 and answer["tokens_in_per_request"] == 10.0
    assert answer["thumbs_up_change"] is None  # one user last week: no interval to compare with


def test_the_experiments_of_the_two_weeks_in_the_order_they_started(ledger):
    db, _ids, (first, second) = ledger
    rows = week_over_week(db, WEEK_ENDING)["experiments"]
    assert [(r["id"], r["status"], r["candidate_share"], r["events"]) for r in rows] == [
        (first, "promoted", 0.5, {"last": 3, "this": 0}), (second, "running", 0.0, {"last": 0, "this": 8})]


def test_the_simulated_share_counts_events_users_and_feedback(ledger):
    db, _ids, _experiments = ledger
    simulated = week_over_week(db, WEEK_ENDING)["simulated"]
    assert simulated["this"] == {"events": 8, "simulated_events": 2, "simulated_users": 2, "feedback": 6,
                                 "simulated_feedback": 2, "any": True, "all": False}
    assert simulated["last"] == {"events": 3, "simulated_events": 0, "simulated_users": 0, "feedback": 1,
                                 "simulated_feedback": 0, "any": False, "all": False}
    assert simulated["both"]["events"] == 11 and simulated["both"]["feedback"] == 7


def test_a_week_of_one_simulated_request_is_all_simulated_and_an_empty_one_is_not(sqlite_db):
    running = traffic.start(sqlite_db)
    with sqlite_db.session() as session:
        session.execute(insert(SearchEvent), [search_event(running.id, _at(WEEKS.this_start, 1), SIM_A, "q")])
    simulated = week_over_week(sqlite_db, WEEK_ENDING)["simulated"]
    assert (simulated["this"]["all"], simulated["last"]["all"], simulated["both"]["all"]) == (True, False, True)
    assert simulated["last"]["any"] is False and simulated["this"]["simulated_users"] == 1


def test_a_bad_week_ending_is_named_with_what_was_given():
    assert parse_week_ending("") is None
    given = "2025-13-45 is not a date, and this text runs on"
    with pytest.raises(ValueError) as raised:
        parse_week_ending(given)
    assert repr(given[:40]) in str(raised.value) and given[:41] not in str(raised.value)
