"""Answer-score queries on SQLite and PostgreSQL: the sample, idempotent saves, the read-back."""

from __future__ import annotations

import pytest

from store.models import AnswerScore, SearchEvent
from store.scores import ScoringInput, events_to_score, save_scores, scores_by_event
from tests.store.conftest import event_row


def _events(db, n: int, **overrides) -> list[str]:
    rows = [event_row(**overrides) for _ in range(n)]
    with db.session() as session:
        session.add_all(SearchEvent(**row) for row in rows)
    return [row["id"] for row in rows]


def test_sample_is_per_arm_and_skips_what_cannot_or_need_not_be_scored(db):
    control = _events(db, 4, arm="control", answer="an answer")
    candidate = _events(db, 3, arm="candidate", served_arm="control", status="fallback", answer="fell back")
    _events(db, 2, arm="candidate", status="error", answer=None)
    _events(db, 1, arm="candidate", answer="   ")
    _events(db, 1, arm="candidate", answer=None)
    _events(db, 2, arm="control", experiment_id="another-experiment")
    save_scores(db, [(control[0], "grounding", 0.5, None)])

    sample = events_to_score(db, "exp-1", "grounding", per_arm=10)
    assert {s.event_id for s in sample} == set(control[1:]) | set(candidate)
    # A grounding score does not count as a judge score.
    assert {s.event_id for s in events_to_score(db, "exp-1", "judge", per_arm=10)} == set(control) | set(candidate)

    capped = events_to_score(db, "exp-1", "grounding", per_arm=2)
    assert [s.arm for s in capped].count("control") == 2 and [s.arm for s in capped].count("candidate") == 2
    assert events_to_score(db, "exp-1", "grounding", per_arm=0) == []

    first = next(s for s in sample if s.event_id == candidate[0])
    assert first == ScoringInput(candidate[0], "candidate", "what is a list comprehension?", "fell back",
                                 [{"role": "user", "content": "what is a list comprehension?"}])


def test_sample_is_random_but_deterministic_for_a_seed(db):
    ids = _events(db, 40, arm="control")
    pick = [s.event_id for s in events_to_score(db, "exp-1", "judge", per_arm=5, seed=7)]
    assert pick == [s.event_id for s in events_to_score(db, "exp-1", "judge", per_arm=5, seed=7)]
    assert pick != [s.event_id for s in events_to_score(db, "exp-1", "judge", per_arm=5, seed=8)]
    # Not just the first rows written.
    assert set(pick) != set(ids[:5])
    # More traffic does not reshuffle the order: what was picked before is still ahead of a later pick.
    save_scores(db, [(event_id, "judge", 1.0, None) for event_id in pick[:2]])
    assert [s.event_id for s in events_to_score(db, "exp-1", "judge", per_arm=3, seed=7)] == pick[2:5]


def test_save_is_idempotent_and_reads_back_by_experiment_and_method(db):
    a, b = _events(db, 2)
    (other,) = _events(db, 1, experiment_id="exp-2")
    rows = [(a, "grounding", 0.9, {"sentences": 2}), (b, "grounding", 0.1, None), (a, "judge", 0.75, {"raw": "4"}),
            (other, "grounding", 0.3, None)]
    assert save_scores(db, rows) == 4
    assert save_scores(db, rows) == 0
    # A second score for a stored pair is skipped, never an IntegrityError; duplicates within a call too.
    assert save_scores(db, [(a, "grounding", 0.0, None), (b, "judge", 0.5, None), (b, "judge", 0.25, None)]) == 1
    assert save_scores(db, []) == 0

    assert scores_by_event(db, "exp-1", "grounding") == {a: pytest.approx(0.9), b: pytest.approx(0.1)}
    assert scores_by_event(db, "exp-1", "judge") == {a: pytest.approx(0.75), b: pytest.approx(0.5)}
    assert scores_by_event(db, "exp-2", "grounding") == {other: pytest.approx(0.3)}
    with db.session() as session:
        stored = session.query(AnswerScore).filter_by(event_id=a, method="grounding").one()
        assert stored.detail == {"sentences": 2} and stored.created_at is not None


def test_save_rejects_bad_scores_and_methods(db):
    (event_id,) = _events(db, 1)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            save_scores(db, [(event_id, "grounding", bad, None)])
    with pytest.raises(ValueError, match="unknown scoring method"):
        save_scores(db, [(event_id, "vibes", 0.5, None)])
    with pytest.raises(ValueError, match="unknown scoring method"):
        events_to_score(db, "exp-1", "vibes", per_arm=1)
    assert scores_by_event(db, "exp-1", "grounding") == {}


def test_a_concurrent_writer_between_check_and_insert_is_not_an_error(db, monkeypatch):
    from store import scores

    (event_id,) = _events(db, 1)
    assert save_scores(db, [(event_id, "grounding", 0.4, None)]) == 1
    # As if another process stored the score after this one looked: the insert itself must give way.
    monkeypatch.setattr(scores, "_stored_pairs", lambda session, keys: set())
    assert save_scores(db, [(event_id, "grounding", 0.9, None)]) == 0
    assert scores_by_event(db, "exp-1", "grounding") == {event_id: pytest.approx(0.4)}


def _seeded_order(seed: int, ids: list[str]) -> list[str]:
    """The documented order: ascending SHA-256 of "seed:event_id", read as a big-endian number."""
    import hashlib

    return sorted(ids, key=lambda i: int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest(), "big"))


def test_the_sample_is_each_arms_lowest_seeded_hashes_in_that_order(db):
    control, candidate = _events(db, 12, arm="control"), _events(db, 9, arm="candidate")
    picked = [s.event_id for s in events_to_score(db, "exp-1", "judge", per_arm=4, seed=11)]
    assert picked == _seeded_order(11, control)[:4] + _seeded_order(11, candidate)[:4]
    one = events_to_score(db, "exp-1", "judge", per_arm=1, seed=11)
    assert [s.event_id for s in one] == [_seeded_order(11, control)[0], _seeded_order(11, candidate)[0]]


def test_an_errored_event_with_a_partial_answer_or_an_unknown_arm_is_not_scored(db):
    _events(db, 2, status="error", answer="half an answ")
    _events(db, 1, arm="holdout")  # not an arm the analysis knows
    (kept,) = _events(db, 1)
    assert [s.event_id for s in events_to_score(db, "exp-1", "grounding", per_arm=5)] == [kept]


def test_a_sample_larger_than_one_query_chunk_comes_back_whole(db):
    from store.scores import _CHUNK

    ids = _events(db, _CHUNK + 101, arm="control")
    sample = events_to_score(db, "exp-1", "grounding", per_arm=len(ids))
    assert [s.event_id for s in sample] == _seeded_order(0, ids)
