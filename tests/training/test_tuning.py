"""Prompt tuning over a real SQLite store: which answers become few-shot examples, and the version they make."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from store import prompts, rules
from store.db import Database
from store.models import Feedback, PromptTemplate, SearchEvent, new_id
from training.tuning import find_candidates, tune

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _served(db: Database, template: PromptTemplate, question: str, answer: str | None, *feedback: dict[str, Any],
            age_days: float = 1.0, user_id: str = "u1") -> str:
    event_id = new_id()
    ts = NOW - timedelta(days=age_days)
    with db.session() as session:
        session.add(SearchEvent(id=event_id, ts=ts, user_id=user_id, arm="control", served_arm="control",
                                query=question, answer=answer, status="ok", prompt_template_id=template.id,
                                prompt_template_version=template.version))
        session.flush()
        session.add_all(Feedback(event_id=event_id, ts=ts + timedelta(minutes=1), **f) for f in feedback)
    return event_id


def _candidates(db, template, encoder, **overrides):
    options = {"since": NOW - timedelta(days=7), "min_rating": 4, "max_examples": 5, "encoder": encoder,
               "threshold": 0.9, **overrides}
    return find_candidates(db, template, **options)


def test_candidates_are_positive_answers_of_the_window_best_rated_then_newest(db, encoder):
    v1 = prompts.active(db)
    v2 = prompts.new_version(db, system_prompt="s", template="{question}")  # same name: its events count too
    other = prompts.new_version(db, name="other", system_prompt="s", template="{question}")
    five_old = _served(db, v1, "how do I sort a list", "Use sorted().", {"rating": 5}, age_days=3)
    five_new = _served(db, v2, "how do I reverse a tuple", "Use reversed().", {"rating": 5}, age_days=1)
    thumbs = _served(db, v2, "what is a generator expression", "A lazy comprehension.", {"thumbs": "up"},
                     user_id="sim-3")
    _served(db, v2, "what is a dict view", "A live view.", {"rating": 5}, {"thumbs": "down"})  # mixed: out
    _served(db, v2, "what is a set", "An unordered bag.", {"rating": 3})  # below min_rating
    _served(db, v2, "what is a frozenset", "Immutable.", {"rating": 5, "corrected_answer": "An immutable set."})
    _served(db, v2, "what is a bytearray", None, {"rating": 5})  # no answer
    _served(db, v2, "what is a deque", "A double-ended queue.", {"rating": 5}, age_days=30)  # outside the window
    _served(db, other, "what is a slice", "A range of indices.", {"rating": 5})  # another template

    found = _candidates(db, v2, encoder)
    assert [c.event_id for c in found] == [five_new, five_old, thumbs]
    assert [(c.rating, c.thumbs, c.simulated) for c in found] == [(5, None, False), (5, None, False),
                                                                    (None, "up", True)]
    assert all(c.selected and not c.duplicate for c in found)
    assert [c.event_id for c in _candidates(db, v2, encoder, min_rating=5)] == [five_new, five_old, thumbs]


def test_near_duplicates_of_each_other_and_of_existing_examples_are_dropped_then_capped(db, encoder):
    template = prompts.new_version(db, system_prompt="s", template="{question}",
                                   few_shot=[{"question": "How do I sort a list?", "answer": "sorted()"}])
    _served(db, template, "how do i sort a list", "Use sorted().", {"rating": 5})  # same words as the example
    best = _served(db, template, "open a file for reading", "Use open().", {"rating": 5}, age_days=2)
    _served(db, template, "Open a file for reading?", "open(path).", {"rating": 4}, age_days=1)
    second = _served(db, template, "what does zip do", "Pairs items.", {"rating": 4}, age_days=3)
    third = _served(db, template, "mail me at bob@example.com: what is a set", "A bag.", {"rating": 4}, age_days=4)

    found = {c.event_id: c for c in _candidates(db, template, encoder, max_examples=2)}
    assert [e for e, c in found.items() if c.duplicate] and sum(c.duplicate for c in found.values()) == 2
    assert [e for e, c in found.items() if c.selected] == [best, second]
    assert not found[third].selected and not found[third].duplicate  # over the cap, not a duplicate
    assert "bob@example.com" not in found[third].question  # redacted: examples reach every user's prompt


def test_tune_writes_a_new_active_version_and_never_edits_the_old_one(db, encoder):
    base = prompts.new_version(db, system_prompt="Be brief.", template="Q: {question}\n{context}",
                               few_shot=[{"question": "old question", "answer": "old answer"}])
    fresh = _served(db, base, "how do I copy a list", "Use list.copy().", {"rating": 5})

    preview = tune(db, base, max_examples=5, encoder=encoder, now=NOW, dry_run=True)
    assert preview.created is None and preview.plan.changed
    assert prompts.active(db).id == base.id

    result = tune(db, base, max_examples=5, encoder=encoder, now=NOW)
    created = result.created
    assert created.version == base.version + 1 and created.active
    assert created.few_shot == [{"question": "how do I copy a list", "answer": "Use list.copy().", "event_id": fresh},
                                {"question": "old question", "answer": "old answer"}]
    assert (created.system_prompt, created.template) == ("Be brief.", "Q: {question}\n{context}")
    old = prompts.get(db, base.id)
    assert (old.active, old.few_shot) == (False, [{"question": "old question", "answer": "old answer"}])

    again = tune(db, created, max_examples=5, encoder=encoder, now=NOW)  # nothing new: no version
    assert again.created is None and not again.plan.changed
    assert again.plan.candidates[0].duplicate  # the example it already has

    capped = tune(db, created, max_examples=1, encoder=encoder, now=NOW, activate=False)
    assert capped.created.few_shot == created.few_shot[:1] and not capped.created.active
    assert prompts.active(db).id == created.id


def test_approved_rules_go_into_the_next_version_once(db, encoder):
    base = prompts.active(db)
    rules.propose(db, [("instruction", 'Begin every answer with "Answer:".', ["f1", "f2"]),
                       ("required_format", "Answer: {answer}", ["f1", "f2"]),
                       ("banned_phrase", "As an AI,", ["f3", "f4"]),
                       ("instruction", "Rejected sentence.", ["f5", "f6"])])
    by_text = {r.text: r for r in rules.list_rules(db)}
    for text in ('Begin every answer with "Answer:".', "Answer: {answer}", "As an AI,"):
        rules.decide(db, by_text[text].id, "approved")
    rules.decide(db, by_text["Rejected sentence."].id, "rejected")

    created = tune(db, base, encoder=encoder, now=NOW).created
    assert created.system_prompt == base.system_prompt + '\n\nBegin every answer with "Answer:".'
    assert [(r["kind"], r["text"]) for r in created.output_rules] == [("required_format", "Answer: {answer}"),
                                                                       ("banned_phrase", "As an AI,")]
    assert prompts.apply_output_rules("As an AI, use sorted().", created.output_rules) == "Answer: use sorted()."
    assert tune(db, created, encoder=encoder, now=NOW).created is None  # already in: nothing to add


@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_the_threshold_decides_what_a_near_duplicate_is(db, encoder, threshold):
    template = prompts.active(db)
    _served(db, template, "sort a list of numbers", "sorted()", {"rating": 5}, age_days=1)
    _served(db, template, "sort a list of strings", "sorted()", {"rating": 5}, age_days=2)
    found = _candidates(db, template, encoder, threshold=threshold)
    assert [c.duplicate for c in found] == ([False, True] if threshold == 0.5 else [False, False])
