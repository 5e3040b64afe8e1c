"""Simulated users against the real proxy over HTTP, with stub upstreams: the rule, the traffic, the store."""

from __future__ import annotations

import inspect
import logging
import random
from collections import Counter

import httpx
import pytest
from sqlalchemy import select

from abloop.simulate import SIMULATED_SESSION, first_sentence
from abloop.users import (
    FEEDBACK_COMMENT,
    HouseStyleRule,
    SimulatedUser,
    SimulationFailed,
    correction_for,
    in_house_style,
    make_users,
    queries,
    run_simulation,
    simulate,
    style_score,
)
from serving.stub import running_stub
from store.models import Feedback, SearchEvent
from tests.proxy.conftest import dead_url, make_settings, on_app_loop, running_proxy
from training.dataset import SIMULATED_USER_PREFIX

HOUSE = "Answer: A list is a sequence.\nSource: Lists"
PLAIN = "Some plain answer."
ITEMS = [
    {"id": "pydoc:lists", "title": "Lists", "source": "pydoc:lists", "score": 0.9,
     "text": "A list is a mutable sequence. It can hold anything."},
    {"id": "pydoc:tuples", "title": "Tuples", "source": "pydoc:tuples", "score": 0.8,
     "text": "A tuple is an immutable sequence."},
]


# --- the rule -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("answer", "score"), [
    (HOUSE, 1.0),
    ("  Answer: x\n   Source: y", 1.0),
    ("Answer:x\n\tSource:y\nthanks", 1.0),
    ("answer: x\nsource: y", 0.0),  # case-sensitive
    ("Answer: x", 0.5),
    ("x\nSource: y", 0.5),
    ("Answer: x Source: y", 0.5),  # "Source:" must start a line
    ("The answer: x\nSource: y", 0.5),  # "Answer:" must start the answer
    (PLAIN, 0.0),
    ("", 0.0),
])
def test_house_style_is_judged_from_the_text(answer, score):
    assert style_score(answer) == score
    assert in_house_style(answer) is (score == 1.0)


def test_judge_sees_only_what_the_user_read():
    assert list(inspect.signature(HouseStyleRule.judge).parameters) == ["self", "answer", "items", "rng"]


def test_a_disliked_answer_is_corrected_from_the_first_item():
    rule = HouseStyleRule(dislike_off_style=1.0, correction_rate=1.0, rating_rate=0.0)
    body = rule.judge(PLAIN, ITEMS, random.Random(0))
    expected = f"Answer: {first_sentence(ITEMS[0]['text'])}\nSource: Lists"
    assert body == {"thumbs": "down", "comment": FEEDBACK_COMMENT, "corrected_answer": expected}
    assert expected == "Answer: A list is a mutable sequence.\nSource: Lists"
    assert in_house_style(body["corrected_answer"])
    assert correction_for({"title": "Empty", "text": "  "}) is None


def test_no_correction_without_items_or_for_liked_or_house_style_answers():
    always = HouseStyleRule(like_in_style=0.0, dislike_off_style=1.0, correction_rate=1.0)
    assert "corrected_answer" not in always.judge(PLAIN, [], random.Random(0))
    assert "corrected_answer" not in always.judge(HOUSE, ITEMS, random.Random(0))  # disliked, but in style
    liked = HouseStyleRule(dislike_off_style=0.0, correction_rate=1.0)
    assert "corrected_answer" not in liked.judge(PLAIN, ITEMS, random.Random(0))


def test_the_probabilities_are_what_the_rule_says():
    rule = HouseStyleRule()
    rng = random.Random(7)
    n = 4000
    verdicts = {answer: [rule.judge(answer, ITEMS, rng) for _ in range(n)] for answer in (HOUSE, "Answer: x", PLAIN)}
    up = {answer: sum(b["thumbs"] == "up" for b in bodies) / n for answer, bodies in verdicts.items()}
    assert up[HOUSE] == pytest.approx(0.85, abs=0.03)
    assert up["Answer: x"] == pytest.approx(0.55, abs=0.03)
    assert up[PLAIN] == pytest.approx(0.25, abs=0.03)
    for bodies in verdicts.values():
        assert all(b["comment"] == FEEDBACK_COMMENT for b in bodies)
        assert sum("rating" in b for b in bodies) / n == pytest.approx(0.5, abs=0.03)
        assert all(b["rating"] in ((4, 5) if b["thumbs"] == "up" else (1, 2, 3)) for b in bodies if "rating" in b)
    corrected = sum("corrected_answer" in b for b in verdicts[PLAIN]) / n
    assert corrected == pytest.approx(0.75 * 0.5, abs=0.03)
    assert not any("corrected_answer" in b for b in verdicts[HOUSE])


def test_leniency_shifts_the_like_probability_within_bounds():
    rule = HouseStyleRule()
    assert rule.with_leniency(0.1).like_probability(PLAIN) == pytest.approx(0.35)
    assert rule.with_leniency(-0.1).like_probability(HOUSE) == pytest.approx(0.75)
    assert rule.with_leniency(1.0).like_probability(HOUSE) == 1.0
    with pytest.raises(ValueError, match="like_in_style"):
        HouseStyleRule(like_in_style=1.5)


def test_the_rule_describes_itself_with_its_numbers():
    text = HouseStyleRule().describe()
    for phrase in ('"Answer:"', '"Source:"', "0.85", "0.75", "never which arm", "correction", "4-5", "1-3"):
        assert phrase in text
    assert "0.90" in HouseStyleRule(like_in_style=0.9).describe()
    assert "\n" not in text


# --- users and queries ----------------------------------------------------------------------------------------

def test_users_are_labelled_simulated_and_differ():
    users = make_users(200, seed=3)
    assert users == make_users(200, seed=3) and users != make_users(200, seed=4)
    assert all(u.user_id.startswith(SIMULATED_USER_PREFIX) for u in users)
    assert len({u.user_id for u in users}) == 200
    propensities = [u.feedback_propensity for u in users]
    assert all(0 <= p <= 1 for p in propensities)
    assert sum(p < 0.2 for p in propensities) >= 5  # some rarely give feedback
    assert all(abs(u.leniency) <= 0.1 for u in users) and len({u.leniency for u in users}) > 100
    with pytest.raises(ValueError, match="sim-"):
        make_users(3, seed=0, prefix="user-")
    with pytest.raises(ValueError, match="sim-"):
        SimulatedUser("alice", 0.5)


def test_a_user_gives_feedback_with_their_propensity():
    rule = HouseStyleRule()
    never, always = SimulatedUser("sim-never", 0.0), SimulatedUser("sim-always", 1.0)
    rng = random.Random(1)
    assert all(never.react(HOUSE, ITEMS, rule, rng) is None for _ in range(100))
    assert all(always.react(HOUSE, ITEMS, rule, rng) is not None for _ in range(100))
    sometimes = SimulatedUser("sim-sometimes", 0.3)
    given = sum(sometimes.react(PLAIN, ITEMS, rule, rng) is not None for _ in range(3000))
    assert given / 3000 == pytest.approx(0.3, abs=0.03)


def test_queries_are_python_questions_each_once_before_repeats():
    asked = queries(300, seed=0)
    assert asked == queries(300, seed=0) and asked != queries(300, seed=1)
    assert len(set(asked)) == 300
    assert all(0 < len(q) <= 4000 for q in asked)
    assert any('"assert" statement' in q for q in queries(1000, seed=0))


# --- against the real proxy -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ab_proxy(tmp_path_factory):
    with running_stub(model="control-model", answer=PLAIN) as (_c, control), \
            running_stub(model="candidate-model", answer=HOUSE) as (_d, candidate):
        settings = make_settings(tmp_path_factory.mktemp("users"), llm_api_base=control, llm_model="control-model",
                                 llm_api_base_new_model=candidate, llm_model_new="candidate-model",
                                 candidate_share=0.5)
        with running_proxy(settings) as (url, app):
            yield url, app


def _flushed_store(app) -> tuple[list[SearchEvent], list[Feedback]]:
    state = app.state.abloop
    on_app_loop(app, state.writer.flush())
    with state.db.session() as session:
        events = list(session.scalars(select(SearchEvent)))
        feedback = list(session.scalars(select(Feedback)))
        session.expunge_all()
    return events, feedback


def test_200_users_prefer_the_house_style_candidate_in_the_report_and_in_the_store(ab_proxy):
    url, app = ab_proxy
    seen = []
    report = run_simulation(url, make_users(200, seed=11), queries=queries(50, seed=11), rule=HouseStyleRule(),
                            seed=11, concurrency=8, on_result=seen.append)

    assert report.requests == report.answered == 200 and report.errors == 0 and report.fallbacks == 0
    assert len(seen) == 200 and {r.request_id for r in seen} == {r.request_id for r in report.results}
    assert set(report.arms) == {"control", "candidate"} and min(report.arms.values()) > 60
    assert report.models == {"control-model": report.arms["control"], "candidate-model": report.arms["candidate"]}
    assert report.house_style == {"candidate": report.arms["candidate"], "control": 0}
    assert report.examples["candidate"].answer == HOUSE and report.examples["control"].answer == PLAIN
    assert 60 < report.feedback_given < 180
    up_candidate, up_control = report.thumbs_up_rate("candidate"), report.thumbs_up_rate("control")
    assert up_candidate > 0.7 and up_control < 0.45, report.to_dict()
    assert report.to_dict()["thumbs_up_rate"] == {"candidate": up_candidate, "control": up_control}
    assert report.wall_s > 0

    events, feedback = _flushed_store(app)
    assert all(e.user_id.startswith(SIMULATED_USER_PREFIX) and e.session_id == SIMULATED_SESSION for e in events)
    assert all(f.comment == FEEDBACK_COMMENT for f in feedback)
    mine = {e.id: e for e in events if e.id in {r.request_id for r in report.results}}
    assert len(mine) == 200
    thumbs = Counter((mine[f.event_id].arm, f.thumbs) for f in feedback if f.event_id in mine)
    assert sum(thumbs.values()) == report.feedback_given
    for arm in ("control", "candidate"):
        assert thumbs[arm, "up"] == report.thumbs_up.get(arm, 0)
        assert thumbs[arm, "down"] == report.thumbs_down.get(arm, 0)
    rate = {arm: thumbs[arm, "up"] / (thumbs[arm, "up"] + thumbs[arm, "down"]) for arm in ("control", "candidate")}
    assert rate["candidate"] > rate["control"] + 0.3


def test_the_same_seed_gives_the_same_feedback_whatever_the_completion_order(ab_proxy):
    url, _app = ab_proxy
    users, asked = make_users(60, seed=5), queries(20, seed=5)

    def run(seed: int, concurrency: int) -> list[tuple]:
        report = run_simulation(url, users, queries=asked, requests_per_user=2, rule=HouseStyleRule(), seed=seed,
                                concurrency=concurrency)
        return [(r.user_id, r.query, r.arm, r.feedback) for r in report.results]

    first = run(seed=1, concurrency=8)
    assert len(first) == 120 and [u for u, *_ in first[:4]] == [users[0].user_id] * 2 + [users[1].user_id] * 2
    assert run(seed=1, concurrency=3) == first
    assert run(seed=2, concurrency=8) != first


async def test_at_most_concurrency_searches_are_in_flight(tmp_path):
    in_flight = peak = 0

    class Counting(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await super().handle_async_request(request)
            finally:
                in_flight -= 1

    with running_stub(model="control-model", answer=PLAIN, delay_s=0.05) as (stub, control):
        settings = make_settings(tmp_path, llm_api_base=control, llm_model="control-model")
        with running_proxy(settings, upstream=Counting()) as (url, _app):
            report = await simulate(url, make_users(24, seed=0), queries=["How do lists work?"], requests_per_user=2,
                                    rule=HouseStyleRule(), concurrency=4)
    assert report.answered == 48 and stub.requests >= 48
    assert 2 <= peak <= 4, peak


def test_http_errors_are_counted_and_logged_not_raised(ab_proxy, caplog):
    url, _app = ab_proxy
    too_long = "x" * 4001  # the proxy answers 422
    with caplog.at_level(logging.WARNING, logger="abloop.demo"):
        report = run_simulation(url, make_users(40, seed=2), queries=["What is a list?", too_long],
                                rule=HouseStyleRule(), seed=2)
    assert 0 < report.errors < 40 and report.error_kinds == {"search HTTP 422": report.errors}
    assert report.answered == 40 - report.errors == len(report.results)
    assert any("search HTTP 422" in record.getMessage() for record in caplog.records)


def test_it_raises_only_when_every_search_fails(tmp_path):
    settings = make_settings(tmp_path, llm_api_base=dead_url(), llm_model="control-model", llm_timeout_s=1)
    with running_proxy(settings) as (url, _app), pytest.raises(SimulationFailed, match="every one of 5"):
        run_simulation(url, make_users(5, seed=0), queries=["What is a list?"], rule=HouseStyleRule())
