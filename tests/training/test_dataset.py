import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.training.conftest import messages_for
from training.dataset import (
    CARD_FILE,
    HOLDOUT_FILE,
    PREFERENCES_FILE,
    TRAIN_FILE,
    DatasetCard,
    build_dataset,
    in_holdout,
    read_rows,
)
from training.select import SelectionConfig

NO_SELECTION = SelectionConfig(enabled=False)


def _build(db, out: Path, encoder, **kwargs) -> tuple[DatasetCard, list[dict]]:
    kwargs.setdefault("select", NO_SELECTION)
    kwargs.setdefault("holdout_fraction", 0.0)
    card = build_dataset(db, out, embedder=encoder, **kwargs)
    return card, read_rows(out / TRAIN_FILE) + read_rows(out / HOLDOUT_FILE)


def _answers(rows: list[dict]) -> list[str]:
    return [r["completion"][0]["content"] for r in rows]


def test_rows_are_conversational_prompt_completion(db, add_event, encoder, tmp_path):
    add_event("how do I sort a list?", "Use sorted().", {"rating": 5})
    _, rows = _build(db, tmp_path / "ds", encoder)
    (row,) = rows
    assert row["prompt"] == messages_for("how do I sort a list?")
    assert row["completion"] == [{"role": "assistant", "content": "Use sorted()."}]
    assert row["source"] == "rated" and row["quality"] == 5.0


def test_correction_wins_over_a_good_rating(db, add_event, encoder, tmp_path):
    add_event("q1", "original", {"rating": 5}, {"corrected_answer": "corrected", "rating": 2})
    _, rows = _build(db, tmp_path / "ds", encoder)
    assert _answers(rows) == ["corrected"]
    assert rows[0]["source"] == "correction"


def test_negative_feedback_without_correction_is_excluded(db, add_event, encoder, tmp_path):
    add_event("thumbs down", "bad", {"thumbs": "down"})
    add_event("low rating", "meh", {"rating": 3})
    add_event("mixed signals", "hmm", {"thumbs": "up"}, {"rating": 2})
    add_event("comment only", "ok", {"comment": "interesting"})
    add_event("thumbs up", "good answer", {"thumbs": "up"})
    add_event("rated four", "fine answer", {"rating": 4})
    add_event("down but corrected", "wrong", {"thumbs": "down", "corrected_answer": "right"})
    card, rows = _build(db, tmp_path / "ds", encoder)
    assert sorted(_answers(rows)) == ["fine answer", "good answer", "right"]
    assert card.stages["excluded_negative"] == 3
    assert card.stages["excluded_no_signal"] == 1
    assert card.stages["events_with_feedback"] == 7


def test_min_rating_is_configurable(db, add_event, encoder, tmp_path):
    add_event("rated three", "okay answer", {"rating": 3})
    _, rows = _build(db, tmp_path / "ds", encoder, min_rating=3)
    assert _answers(rows) == ["okay answer"]


def test_correction_emits_a_preference_pair(db, add_event, encoder, tmp_path):
    add_event("q1", "original answer", {"corrected_answer": "better answer"})
    add_event("q2", "liked", {"thumbs": "up"})
    card, _ = _build(db, tmp_path / "ds", encoder)
    (pair,) = read_rows(tmp_path / "ds" / PREFERENCES_FILE)
    assert pair["prompt"] == messages_for("q1")
    assert pair["chosen"] == [{"role": "assistant", "content": "better answer"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "original answer"}]
    assert card.counts["preferences"] == 1


def test_exact_duplicates_keep_the_best_rated(db, add_event, encoder, tmp_path):
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    add_event("How do I sort a list?", "rated four", {"rating": 4}, ts=t0)
    add_event("how do i  sort a LIST?", "rated five", {"rating": 5}, ts=t0 + timedelta(hours=1))
    add_event("How do I sort a list? ", "thumbs up", {"thumbs": "up"}, ts=t0 + timedelta(hours=2))
    card, rows = _build(db, tmp_path / "ds", encoder, semantic_threshold=1.01)
    assert _answers(rows) == ["rated five"]
    assert card.stages["candidates"] == 3 and card.stages["after_exact_dedupe"] == 1


def test_exact_duplicates_prefer_a_correction(db, add_event, encoder, tmp_path):
    add_event("q", "five stars", {"rating": 5})
    add_event("q", "served", {"corrected_answer": "user's own answer"})
    _, rows = _build(db, tmp_path / "ds", encoder, semantic_threshold=1.01)
    assert _answers(rows) == ["user's own answer"]


def test_semantic_duplicates_keep_the_best_rated(db, add_event, encoder, tmp_path):
    # Different prompts (different context), same question words: a semantic duplicate.
    q = "How do I sort a list in Python?"
    add_event(q, "ok answer", {"rating": 4}, messages=messages_for(q, "context A"))
    add_event("how do I sort a Python list", "great answer", {"rating": 5}, messages=messages_for(q, "context B"))
    add_event("What is a generator?", "other topic", {"rating": 4})
    card, rows = _build(db, tmp_path / "ds", encoder, semantic_threshold=0.9)
    assert sorted(_answers(rows)) == ["great answer", "other topic"]
    assert card.stages["after_exact_dedupe"] == 3 and card.stages["after_semantic_dedupe"] == 2


def test_holdout_is_deterministic_and_about_the_fraction(db, add_event, encoder, tmp_path):
    for i in range(300):
        add_event(f"question number {i} about topic {i % 7}", f"answer {i}", {"rating": 5})
    first, _ = _build(db, tmp_path / "a", encoder, holdout_fraction=0.1, semantic_threshold=1.01)
    second, _ = _build(db, tmp_path / "b", encoder, holdout_fraction=0.1, semantic_threshold=1.01)
    assert first.content_hash == second.content_hash
    for name in (TRAIN_FILE, HOLDOUT_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first.counts["train"] + first.counts["holdout"] == 300
    assert 15 <= first.counts["holdout"] <= 45  # 10% of 300, binomial spread
    keys = [f"{i:064x}" for i in range(0, 2**64, 2**64 // 10_000)]
    share = sum(in_holdout(hashlib.sha256(k.encode()).hexdigest(), 0.1) for k in keys) / len(keys)
    assert 0.09 < share < 0.11


def test_holdout_membership_survives_new_data(db, add_event, encoder, tmp_path):
    for i in range(60):
        add_event(f"question {i}", f"answer {i}", {"rating": 5})
    _build(db, tmp_path / "a", encoder, holdout_fraction=0.2, semantic_threshold=1.01)
    for i in range(60, 120):
        add_event(f"question {i}", f"answer {i}", {"rating": 5})
    _build(db, tmp_path / "b", encoder, holdout_fraction=0.2, semantic_threshold=1.01)
    before = {r["id"] for r in read_rows(tmp_path / "a" / HOLDOUT_FILE)}
    after = {r["id"] for r in read_rows(tmp_path / "b" / HOLDOUT_FILE)}
    assert before and before <= after


def _question_of(row: dict) -> str:
    return row["prompt"][-1]["content"].split("Question: ", 1)[1]


def test_one_question_lands_on_one_side_whatever_its_context(db, add_event, encoder, tmp_path):
    """The split follows the user's question, not the whole prompt: the same question asked with other
    retrieved context (or other case and spacing) is never trained on and then scored in the holdout."""
    for i in range(30):
        for n, (asked, context) in enumerate(((f"what is thing {i}", "context A"),
                                              (f"What is  THING {i}", "context B"),
                                              (f"what is thing {i} ", "context C"))):
            add_event(asked, f"answer {n} to {i}", {"rating": 5}, messages=messages_for(asked, context))
    card, _ = _build(db, tmp_path / "ds", encoder, holdout_fraction=0.5, semantic_threshold=1.01)
    assert card.counts["train"] + card.counts["holdout"] == 90  # three prompts per question, all kept
    sides: dict[str, set[str]] = {}
    for side, name in (("train", TRAIN_FILE), ("holdout", HOLDOUT_FILE)):
        for row in read_rows(tmp_path / "ds" / name):
            sides.setdefault(" ".join(_question_of(row).lower().split()), set()).add(side)
    assert len(sides) == 30
    assert all(len(s) == 1 for s in sides.values()), {q: s for q, s in sides.items() if len(s) > 1}
    assert {side for s in sides.values() for side in s} == {"train", "holdout"}  # both sides occur here


def test_a_preference_pair_shares_the_split_of_its_questions_sft_row(db, add_event, encoder, tmp_path):
    """Pairs are made before dedupe, so a pair may come from an event whose SFT row lost to another prompt
    of the same question: it still lands on that question's side."""
    for i in range(30):
        q = f"explain feature {i}"
        add_event(q, f"old {i}", {"corrected_answer": f"new {i}"}, messages=messages_for(q, "context A"))
        add_event(q, f"old b {i}", {"corrected_answer": f"new b {i}"}, messages=messages_for(q, "context B"))
    card, _ = _build(db, tmp_path / "ds", encoder, holdout_fraction=0.5)  # semantic dedupe keeps one per question
    assert card.stages["after_semantic_dedupe"] == 30 and card.counts["preferences"] == 60
    sft_side = {_question_of(row): side for side, name in (("train", TRAIN_FILE), ("holdout", HOLDOUT_FILE))
                for row in read_rows(tmp_path / "ds" / name)}
    pairs = read_rows(tmp_path / "ds" / PREFERENCES_FILE)
    assert {pair["split"] for pair in pairs} == {"train", "holdout"}
    for pair in pairs:
        assert pair["split"] == sft_side[_question_of(pair)], pair["event_id"]


def test_training_rows_are_redacted(db, add_event, encoder, tmp_path):
    q = "my email is jane@example.com and key sk-abcdefghijklmnopqrstuvwx, call 555-123-4567"
    add_event(q, "wrong", {"corrected_answer": "Reply to jane@example.com, Bearer abcdefghijklmnop123"})
    card, _ = _build(db, tmp_path / "ds", encoder)
    for name in (TRAIN_FILE, HOLDOUT_FILE, PREFERENCES_FILE):
        text = (tmp_path / "ds" / name).read_text()
        assert "jane@example.com" not in text and "sk-abcdef" not in text and "555-123" not in text
        assert "abcdefghijklmnop123" not in text
    assert card.redactions == {"email": 2, "secret": 2, "phone": 1}


def test_redaction_can_be_turned_off(db, add_event, encoder, tmp_path):
    add_event("write to jane@example.com", "ok", {"rating": 5})
    _build(db, tmp_path / "ds", encoder, redact=False)
    assert "jane@example.com" in (tmp_path / "ds" / TRAIN_FILE).read_text()


def test_time_window_filters_events(db, add_event, encoder, tmp_path):
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    add_event("old", "old answer", {"rating": 5}, ts=t0 - timedelta(days=1))
    add_event("inside", "inside answer", {"rating": 5}, ts=t0 + timedelta(hours=1))
    add_event("new", "new answer", {"rating": 5}, ts=t0 + timedelta(days=2))
    card, rows = _build(db, tmp_path / "ds", encoder, since=t0, until=t0 + timedelta(days=1))
    assert _answers(rows) == ["inside answer"]
    # Naive datetimes are UTC.
    _, rows = _build(db, tmp_path / "naive", encoder, since=t0.replace(tzinfo=None))
    assert sorted(_answers(rows)) == ["inside answer", "new answer"]
    assert card.window["since"].startswith("2026-03-01")


def test_the_window_includes_its_start_and_excludes_its_end(db, add_event, encoder, tmp_path):
    """Consecutive windows [t0, t1), [t1, t2) see every event once: none twice, none lost at a boundary."""
    t0, t1 = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC)
    add_event("at the start", "start answer", {"rating": 5}, ts=t0)
    add_event("at the end", "end answer", {"rating": 5}, ts=t1)
    _, first = _build(db, tmp_path / "first", encoder, since=t0, until=t1)
    _, second = _build(db, tmp_path / "second", encoder, since=t1, until=t1 + timedelta(days=1))
    assert (_answers(first), _answers(second)) == (["start answer"], ["end answer"])


def test_the_latest_of_several_corrections_is_the_answer(db, add_event, encoder, tmp_path):
    add_event("q1", "served", {"corrected_answer": "first fix"}, {"corrected_answer": "second fix"},
              {"corrected_answer": "  "})  # blank: not a correction
    _, rows = _build(db, tmp_path / "ds", encoder)
    assert _answers(rows) == ["second fix"]
    (pair,) = read_rows(tmp_path / "ds" / PREFERENCES_FILE)
    assert pair["chosen"][0]["content"] == "second fix" and pair["rejected"][0]["content"] == "served"


def test_a_correction_that_repeats_the_served_answer_is_no_preference_pair(db, add_event, encoder, tmp_path):
    add_event("q1", "Use sorted().", {"corrected_answer": "  Use sorted().\n"})
    card, rows = _build(db, tmp_path / "ds", encoder)
    assert _answers(rows) == ["Use sorted()."] and rows[0]["source"] == "correction"
    assert read_rows(tmp_path / "ds" / PREFERENCES_FILE) == [] and card.counts["preferences"] == 0


def test_without_a_logged_query_the_question_is_the_last_user_message(db, add_event, encoder, tmp_path):
    """The question is what semantic dedupe compares: the same last question after different conversations is
    one question (the prompts differ, so exact dedupe keeps both)."""
    for earlier in ("an earlier question", "another earlier question"):
        add_event("", f"answer after {earlier}", {"rating": 5},
                  messages=[*messages_for(earlier), {"role": "assistant", "content": "earlier"},
                            {"role": "user", "content": "how do I sort a list in reverse?"}])
    card, rows = _build(db, tmp_path / "ds", encoder, semantic_threshold=0.9)
    assert card.stages["after_exact_dedupe"] == 2 and len(rows) == card.stages["after_semantic_dedupe"] == 1


def test_preference_pairs_carry_their_event_simulation_flag_and_split(db, add_event, encoder, tmp_path):
    ids = {add_event(f"question {n}", f"served {n}", {"corrected_answer": f"fixed {n}"},
                     user_id="sim-7" if n % 2 else "person-3"): n for n in range(12)}
    _build(db, tmp_path / "ds", encoder, holdout_fraction=0.5)
    split_of = {row["event_id"]: split for split, name in (("train", TRAIN_FILE), ("holdout", HOLDOUT_FILE))
                for row in read_rows(tmp_path / "ds" / name)}
    pairs = read_rows(tmp_path / "ds" / PREFERENCES_FILE)
    assert {pair["event_id"] for pair in pairs} == set(ids) == set(split_of)
    assert {split_of[pair["event_id"]] for pair in pairs} == {"train", "holdout"}  # both sides occur here
    for pair in pairs:
        assert pair["split"] == split_of[pair["event_id"]]  # a prompt held out for SFT is held out for DPO too
        assert pair["simulated"] == (ids[pair["event_id"]] % 2 == 1)


def test_card_reports_counts_by_source_stage_and_hash(db, add_event, encoder, tmp_path):
    add_event("q1", "a1", {"rating": 5})
    add_event("q2", "a2", {"corrected_answer": "c2"})
    add_event("q3", "a3", {"thumbs": "down"})
    add_event("q4", "a4", {"rating": 5}, user_id="sim-0001")
    card, _ = _build(db, tmp_path / "ds", encoder)
    on_disk = DatasetCard.load(tmp_path / "ds")
    assert on_disk.content_hash == card.content_hash and len(card.content_hash) == 64
    assert card.counts["by_source"]["train"] == {"rated": 2, "correction": 1}
    assert card.counts["simulated"] == 1
    assert list(card.stages)[:3] == ["events_with_feedback", "excluded_negative", "candidates"]
    assert card.stages["train"] == 3
    assert (tmp_path / "ds" / CARD_FILE).is_file()


def test_empty_store_builds_an_empty_dataset(db, encoder, tmp_path):
    card = build_dataset(db, tmp_path / "ds", embedder=encoder)
    assert card.counts["train"] == 0 and (tmp_path / "ds" / TRAIN_FILE).read_text() == ""


def test_selection_runs_by_default_and_reports(db, add_event, encoder, tmp_path):
    for i in range(5):
        add_event(f"sorting question {i}", f"Use sorted() on the list {i}.", {"rating": 4})
    add_event("odd question", "Completely different words here.", {"rating": 4})
    add_event("odd corrected", "served", {"corrected_answer": "Unrelated unique correction text."})
    card = build_dataset(
        db, tmp_path / "ds", embedder=encoder, holdout_fraction=0.0, select=SelectionConfig(epsilon=0.5)
    )
    assert card.selection["dense_kept"] == 5
    assert card.selection["rare_kept"] == 1  # the correction; the 4-star loner is dropped
    assert card.selection["dropped_rare_low_quality"] == 1
    assert card.stages["after_selection"] == 6


def test_holdout_fraction_is_validated(db, encoder, tmp_path):
    with pytest.raises(ValueError):
        build_dataset(db, tmp_path / "ds", embedder=encoder, holdout_fraction=1.0)


@pytest.mark.slow
def test_semantic_dedupe_with_the_real_embedder(db, add_event, tmp_path):
    from training import default_encoder

    add_event("How do I sort a list in Python?", "four stars", {"rating": 4})
    add_event("How can I sort a Python list?", "five stars", {"rating": 5})
    add_event("how to sort a list in python", "thumbs up", {"thumbs": "up"})
    add_event("What does the assert statement do?", "assert answer", {"rating": 4})
    _, rows = _build(db, tmp_path / "ds", default_encoder())  # default threshold 0.95
    assert sorted(_answers(rows)) == ["assert answer", "five stars"]
