"""Rules from corrections in the store: idempotent proposals, one decision each, the corrections query."""

from __future__ import annotations

import pytest

from store import rules
from store.db import Database
from store.models import Feedback, SearchEvent, new_id, utcnow


def _correction(db: Database, answer: str | None, corrected: str | None, user_id: str = "u1") -> str:
    with db.session() as session:
        event = SearchEvent(id=new_id(), ts=utcnow(), user_id=user_id, arm="control", query="q", status="ok",
                            answer=answer, messages=[{"role": "user", "content": "q"}])
        session.add(event)
        session.flush()
        feedback = Feedback(id=new_id(), event_id=event.id, thumbs="down", corrected_answer=corrected)
        session.add(feedback)
    return feedback.id


def test_proposing_twice_adds_supporting_ids_and_never_duplicates(db: Database) -> None:
    first = rules.propose(db, [("banned_phrase", "As an AI,", ["f1", "f2"]), ("instruction", "Be brief.", ["f1"])])
    assert first == {"created": 2, "updated": 0, "unchanged": 0}
    again = rules.propose(db, [("banned_phrase", "As an AI,", ["f2", "f3"]), ("instruction", "Be brief.", ["f1"])])
    assert again == {"created": 0, "updated": 1, "unchanged": 1}
    stored = {r.text: r for r in rules.list_rules(db)}
    assert len(stored) == 2 and stored["As an AI,"].feedback_ids == ["f1", "f2", "f3"]
    assert {r.status for r in stored.values()} == {"proposed"}
    with pytest.raises(ValueError):
        rules.propose(db, [("python_code", "x", ["f1"])])


def test_a_rule_is_decided_once(db: Database) -> None:
    rules.propose(db, [("instruction", "Cite the source.", ["f1"]), ("banned_phrase", "Sure!", ["f1"])])
    cite, sure = sorted(rules.list_rules(db, "proposed"), key=lambda r: r.text)
    approved = rules.decide(db, cite.id, "approved")
    assert approved.status == "approved" and approved.decided_at is not None
    with pytest.raises(rules.RuleAlreadyDecided):
        rules.decide(db, cite.id, "rejected")
    with pytest.raises(rules.RuleNotFound):
        rules.decide(db, "no-such-rule", "approved")
    rules.decide(db, sure.id, "rejected")
    assert [r.id for r in rules.approved(db)] == [cite.id]
    assert [r.id for r in rules.list_rules(db, "rejected")] == [sure.id]
    assert rules.list_rules(db, "proposed") == []
    # A rejected rule proposed again stays rejected; it only gains support.
    rules.propose(db, [("banned_phrase", "Sure!", ["f9"])])
    [again] = rules.list_rules(db, "rejected")
    assert again.feedback_ids == ["f1", "f9"]
    with pytest.raises(ValueError):
        rules.list_rules(db, "maybe")


def test_corrections_are_corrected_answers_of_answered_events(db: Database) -> None:
    kept = _correction(db, "the answer", "Answer: the answer", user_id="sim-7")
    _correction(db, None, "a correction of nothing")
    _correction(db, "an answer", None)
    [correction] = rules.corrections(db)
    assert (correction.feedback_id, correction.answer, correction.corrected, correction.user_id) == (
        kept, "the answer", "Answer: the answer", "sim-7")
    assert correction.messages == [{"role": "user", "content": "q"}]


def test_the_corrections_query_is_oldest_first_from_since(db: Database) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    ids = [_correction(db, f"answer {n}", f"corrected {n}") for n in range(3)]
    start = utcnow() - timedelta(hours=1)
    with db.session() as session:  # given out of the ids' order, one exactly at `since`
        for minutes, feedback_id in zip((30, 10, 20), ids, strict=True):
            session.execute(update(Feedback).where(Feedback.id == feedback_id)
                            .values(ts=start + timedelta(minutes=minutes)))  # fmt: skip
    found = rules.corrections(db)
    assert [c.feedback_id for c in found] == [ids[1], ids[2], ids[0]]
    assert all(c.event_id and c.answer.startswith("answer") and c.corrected.startswith("corrected") for c in found)
    with db.session() as session:
        events = {f.id: f.event_id for f in session.query(Feedback)}
    assert [c.event_id for c in found] == [events[i] for i in (ids[1], ids[2], ids[0])]
    since = [c.feedback_id for c in rules.corrections(db, since=start + timedelta(minutes=20))]
    assert since == [ids[2], ids[0]]  # from `since` on, itself included


def test_a_rule_is_its_kind_and_text_and_the_counts_add_up(db: Database) -> None:
    same_text = rules.propose(db, [("banned_phrase", "Sure!", ["f1"]), ("instruction", "Sure!", ["f1"]),
                                   ("banned_phrase", "Okay!", ["f1"])])  # fmt: skip
    assert same_text == {"created": 3, "updated": 0, "unchanged": 0}
    counted = rules.propose(db, [("banned_phrase", "Sure!", ["f1"]), ("instruction", "Sure!", ["f1"]),
                                 ("banned_phrase", "Okay!", ["f2"]), ("banned_phrase", "Sure!", ["f3"])])  # fmt: skip
    assert counted == {"created": 0, "updated": 2, "unchanged": 2}
    stored = rules.list_rules(db, "proposed")
    assert len(stored) == 3 and all(r.created_at is not None for r in stored)


def test_rules_are_listed_newest_first_and_approved_in_the_order_proposed(db: Database) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from store.models import Rule

    rules.propose(db, [("instruction", f"Rule {n}.", ["f1"]) for n in range(3)])
    by_text = {r.text: r.id for r in rules.list_rules(db)}
    start = utcnow()
    a, b, c = sorted(by_text.values())
    with db.session() as session:  # creation times in neither order of the ids: c, then a, then b
        for minutes, rule_id in ((0, c), (1, a), (2, b)):
            created = start + timedelta(minutes=minutes)
            session.execute(update(Rule).where(Rule.id == rule_id).values(created_at=created))
    assert [r.id for r in rules.list_rules(db)] == [b, a, c]
    for rule_id in (a, b, c):
        rules.decide(db, rule_id, "approved")
    assert [r.id for r in rules.approved(db)] == [c, a, b]


def test_bad_input_names_itself(db: Database) -> None:
    with pytest.raises(ValueError, match="unknown rule kind 'python_code'"):
        rules.propose(db, [("python_code", "x", ["f1"])])
    with pytest.raises(ValueError, match="unknown rule status 'maybe'"):
        rules.list_rules(db, "maybe")
    with pytest.raises(ValueError, match="a decision is approved or rejected, not 'proposed'"):
        rules.decide(db, "any", "proposed")
    with pytest.raises(rules.RuleNotFound, match="unknown rule 'no-such-rule'"):
        rules.decide(db, "no-such-rule", "approved")
