"""Answer scoring over a store of logged events: grounding with the real embedder, a mocked LLM judge."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial

import httpx
import pytest
from prefect import flow

from flows.scoring import score_answers, score_experiment
from retrieval.grounding import GroundingScorer
from retrieval.judge import LLMJudge
from store.db import Database
from store.models import SearchEvent, new_id
from store.prompts import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE, render_messages
from store.scores import scores_by_event
from tests.retrieval.conftest import HashEmbedder


@dataclass
class _Passage:
    title: str
    text: str


PASSAGES = [
    _Passage("List comprehensions", "List comprehensions provide a concise way to create lists. A list "
             "comprehension consists of brackets containing an expression followed by a for clause."),
    _Passage("sorted", "The sorted() function returns a new sorted list from the items in an iterable. The key "
             "argument specifies a function of one argument used to extract a comparison key."),
]
GROUNDED = "List comprehensions provide a concise way to create lists. sorted() returns a new sorted list."
UNGROUNDED = "The Eiffel Tower was completed in 1889 for the World's Fair. It is about 330 metres tall."


@pytest.fixture(scope="module")
def embedder():
    from retrieval.embedder import Embedder
    from store.config import default_embedding_model

    return Embedder(default_embedding_model(), device="cpu")


@pytest.fixture
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'scores.db'}")
    database.migrate()
    yield database
    database.dispose()


def _log(db: Database, arm: str, answer: str | None, n: int = 1, status: str = "ok", query: str = "lists?") -> list:
    ids = [new_id() for _ in range(n)]
    messages = render_messages(DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE, [], PASSAGES, query)
    with db.session() as session:
        session.add_all(SearchEvent(id=i, experiment_id="exp-1", arm=arm, served_arm=arm, query=query,
                                    messages=messages, answer=answer, status=status) for i in ids)
    return ids


def _judge(handler) -> LLMJudge:
    return LLMJudge("http://judge.test/v1", "judge", transport=httpx.MockTransport(handler))


def test_grounded_answers_outscore_ungrounded_ones_and_a_rerun_scores_nothing_twice(db, embedder):
    control = _log(db, "control", GROUNDED, n=3)
    candidate = _log(db, "candidate", UNGROUNDED, n=3)
    _log(db, "candidate", None, status="error")

    counts = score_experiment(db, "exp-1", per_arm=2, scorer=GroundingScorer(embedder))
    assert counts == {"grounding": 4, "judge": 0, "judge_failures": 0, "judge_skipped": 0}
    scores = scores_by_event(db, "exp-1", "grounding")
    assert len(set(scores) & set(control)) == 2 and len(set(scores) & set(candidate)) == 2
    # Measured: 0.95 and 0.05.
    assert all(scores[i] > 0.85 for i in set(scores) & set(control))
    assert all(scores[i] < 0.3 for i in set(scores) & set(candidate))

    # The next run takes the events not yet scored, then there is nothing left.
    assert score_experiment(db, "exp-1", per_arm=2, scorer=GroundingScorer(embedder))["grounding"] == 2
    assert score_experiment(db, "exp-1", per_arm=2, scorer=GroundingScorer(embedder))["grounding"] == 0
    assert len(scores_by_event(db, "exp-1", "grounding")) == 6


def test_a_judge_failure_on_one_event_is_counted_and_retried_next_time(db):
    _log(db, "control", GROUNDED, n=3)
    _log(db, "candidate", GROUNDED, query="fail this one")
    prompts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["messages"][-1]["content"]
        prompts.append(prompt)
        if "fail this one" in prompt:
            return httpx.Response(500, text="boom")
        return httpx.Response(200, json={"choices": [{"message": {"content": "5"}}]})

    scorer = GroundingScorer(HashEmbedder())
    counts = score_experiment(db, "exp-1", per_arm=10, scorer=scorer, judge=_judge(handler))
    assert counts == {"grounding": 4, "judge": 3, "judge_failures": 1, "judge_skipped": 0}
    assert set(scores_by_event(db, "exp-1", "judge").values()) == {1.0}
    # The judge sees the passages parsed back out of the logged prompt.
    assert all(f"[{n}] {p.text}" in prompts[0] for n, p in enumerate(PASSAGES, start=1))

    again = score_experiment(db, "exp-1", per_arm=10, scorer=scorer, judge=_judge(handler))
    assert again == {"grounding": 0, "judge": 0, "judge_failures": 1, "judge_skipped": 0}


def test_an_unreachable_judge_stops_after_a_few_failures_in_a_row(db):
    _log(db, "control", GROUNDED, n=8)
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("refused", request=request)

    counts = score_experiment(db, "exp-1", per_arm=10, scorer=GroundingScorer(HashEmbedder()),
                              judge=_judge(handler))
    assert counts == {"grounding": 8, "judge": 0, "judge_failures": 5, "judge_skipped": 3}
    assert len(calls) == 5


def test_the_prefect_task_wires_embedder_judge_and_store(db, embedder, monkeypatch):
    _log(db, "control", GROUNDED, n=2)
    _log(db, "candidate", UNGROUNDED, n=2)
    keys: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers.get("Authorization"))
        return httpx.Response(200, json={"choices": [{"message": {"content": "Grade: 2"}}]})

    @flow
    def evaluate(**kwargs) -> dict:  # as evaluate_arms calls it
        return score_answers(db.url, "exp-1", 5, "ignored-model", **kwargs)

    # The task builds its own embedder and judge; hand it the session's model and a mocked endpoint.
    monkeypatch.setattr("retrieval.embedder.Embedder", lambda model: embedder)
    monkeypatch.setattr("retrieval.judge.LLMJudge", partial(LLMJudge, transport=httpx.MockTransport(handler)))
    counts = evaluate(judge_api_base="http://judge.test/v1", judge_model="judge", judge_api_key="sk-secret")
    assert counts == {"grounding": 4, "judge": 4, "judge_failures": 0, "judge_skipped": 0}
    assert keys == ["Bearer sk-secret"] * 4
    assert set(scores_by_event(db, "exp-1", "judge").values()) == {0.25}

    # Without a judge endpoint only grounding runs (and here nothing is left to ground).
    assert evaluate() == {"grounding": 0, "judge": 0, "judge_failures": 0, "judge_skipped": 0}
