"""Prompt templates: versions are rows, never edits."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from store import prompts
from store.db import Database
from store.models import PromptTemplate


def test_active_seeds_version_one(db: Database) -> None:
    first = prompts.active(db)
    assert (first.name, first.version, first.active) == (prompts.DEFAULT_NAME, 1, True)
    assert first.system_prompt == prompts.DEFAULT_SYSTEM_PROMPT
    assert first.template == prompts.DEFAULT_TEMPLATE and first.few_shot == []
    again = prompts.active(db)
    assert again.id == first.id


def test_new_version_becomes_active_and_leaves_v1_unchanged(db: Database) -> None:
    v1 = prompts.active(db)
    shots = [{"question": "q", "answer": "a"}]
    v2 = prompts.new_version(db, system_prompt="Be brief.", template="Q: {question}\n{context}", few_shot=shots)
    assert (v2.version, v2.active, v2.few_shot) == (2, True, shots)
    assert prompts.active(db).id == v2.id
    with db.session() as session:
        rows = {row.version: row for row in session.scalars(select(PromptTemplate))}
    assert set(rows) == {1, 2}
    old = rows[1]
    assert old.id == v1.id and old.active is False
    assert (old.system_prompt, old.template, old.few_shot) == (v1.system_prompt, v1.template, v1.few_shot)
    assert old.created_at is not None


def test_names_are_independent_and_templates_need_a_question(db: Database) -> None:
    prompts.active(db)
    other = prompts.new_version(db, name="other", system_prompt="s", template="{question}")
    assert other.version == 1
    assert prompts.active(db).version == 1
    with pytest.raises(ValueError):
        prompts.new_version(db, system_prompt="s", template="no placeholder")


def test_a_version_written_inactive_waits_and_activating_it_switches(db: Database) -> None:
    v1 = prompts.active(db)
    rules = [{"kind": "banned_phrase", "text": "As an AI,"}]
    v2 = prompts.new_version(db, system_prompt="s2", template="{question}", output_rules=rules, activate=False)
    assert (v2.version, v2.active, v2.output_rules) == (2, False, rules)
    assert prompts.active(db).id == v1.id
    with db.session() as session:
        prompts.activate_in(session, v2.id)
    assert prompts.active(db).id == v2.id and prompts.get(db, v1.id).active is False
    assert [v.version for v in prompts.list_versions(db)] == [2, 1]
    assert [v.id for v in prompts.list_versions(db, active_only=True)] == [v2.id]
    assert prompts.get(db, "no-such-id") is None


def test_usage_and_served_with_cover_every_version_of_a_name(db: Database) -> None:
    from store.models import Feedback, SearchEvent, new_id, utcnow

    v1 = prompts.active(db)
    v2 = prompts.new_version(db, system_prompt="s", template="{question}")
    other = prompts.new_version(db, name="other", system_prompt="s", template="{question}")
    with db.session() as session:
        for template, feedback in ((v1, 2), (v2, 1), (v2, 0), (other, 1)):
            event = SearchEvent(id=new_id(), ts=utcnow(), arm="control", query="q", status="ok",
                                prompt_template_id=template.id, prompt_template_version=template.version)
            session.add(event)
            session.flush()
            session.add_all(Feedback(event_id=event.id, thumbs="up") for _ in range(feedback))
    assert prompts.usage(db, [v1.id, v2.id]) == {v1.id: {"events": 1, "feedback": 2},
                                                 v2.id: {"events": 2, "feedback": 1}}
    never_served = prompts.new_version(db, system_prompt="s3", template="{question}")
    assert prompts.usage(db, [never_served.id]) == {never_served.id: {"events": 0, "feedback": 0}}
    assert prompts.usage(db, []) == {}
    served = list(prompts.served_with(db, prompts.DEFAULT_NAME))
    assert sorted(len(feedback) for _event, feedback in served) == [1, 2]  # events without feedback are not rated
    assert {event.prompt_template_id for event, _ in served} == {v1.id, v2.id}


@pytest.mark.parametrize(
    ("answer", "rules", "titles", "expected"),
    [
        ("As an AI, lists sort.", [{"kind": "banned_phrase", "text": "as an ai,"}], [], "lists sort."),
        ("Lists sort. I hope this helps! Bye", [{"kind": "banned_phrase", "text": "I hope this helps!"}], [],
         "Lists sort. Bye"),
        ("code:\n    x = 1  # keep", [{"kind": "banned_phrase", "text": "absent"}], [], "code:\n    x = 1  # keep"),
        ("lists sort.", [{"kind": "required_format", "text": "Answer: {answer}"}], [], "Answer: lists sort."),
        ("Answer:lists sort.", [{"kind": "required_format", "text": "Answer: {answer}"}], [], "Answer:lists sort."),
        ("lists sort.", [{"kind": "required_format", "text": "{answer}\nSource: {title}"}], ["Lists", "Tuples"],
         "lists sort.\nSource: Lists"),
        ("lists sort.\n  Source: Tuples ", [{"kind": "required_format", "text": "{answer}\nSource: {title}"}],
         ["Lists"], "lists sort.\n  Source: Tuples "),
        ("lists sort.", [{"kind": "required_format", "text": "{answer}\nSource: {title}"}], [], "lists sort."),
        ("{title} stays", [{"kind": "required_format", "text": "Answer: {answer}"}], ["T"], "Answer: {title} stays"),
        ("x", [{"kind": "required_format", "text": "no placeholder"}, {"kind": "eval", "text": "__import__('os')"},
               {"kind": "banned_phrase", "text": "  "}], [], "x"),
    ],
)
def test_output_rules_are_plain_text_transforms(answer, rules, titles, expected) -> None:
    assert prompts.apply_output_rules(answer, rules, titles) == expected


def test_output_rules_apply_in_order_and_twice_is_once() -> None:
    rules = [{"kind": "banned_phrase", "text": "As an AI language model,"},
             {"kind": "required_format", "text": "Answer: {answer}"},
             {"kind": "required_format", "text": "{answer}\nSource: {title}"}]
    once = prompts.apply_output_rules("As an AI language model, use sorted().", rules, ["Sorting HOW TO"])
    assert once == "Answer: use sorted().\nSource: Sorting HOW TO"
    assert prompts.apply_output_rules(once, rules, ["Another title"]) == once
