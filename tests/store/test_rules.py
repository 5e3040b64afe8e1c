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
