"""Values the databases cannot store (NUL, lone surrogates, NaN in JSON) never cost a logged row."""

from __future__ import annotations

import math
from pathlib import Path

from store.db import Database
from store.models import Feedback, SearchEvent
from store.sanitize import REPLACEMENT, SANITIZED_KEY, storable
from store.spool import REJECTED_DIR, Entry, encode_entry
from tests.store.conftest import event_row, feedback_row, wait_until

R = REPLACEMENT


def _nul_event() -> dict:
    return event_row(
        query="open\x00a file",
        user_id="user\x00-7",
        messages=[{"role": "user", "content": "Question: open\x00a file"}, {"role\x00": "assistant", "content": "ok"}],
        retrieved={"ids": ["doc-1"], "scores": [float("nan")], "index_version": "v1"},
        answer="Use open()\x00 and a lone \ud800 surrogate",
    )


def _assert_stored_clean(db: Database, event: dict, feedback: dict) -> None:
    with db.session() as session:
        stored = session.get(SearchEvent, event["id"])
        assert stored is not None
        assert (stored.query, stored.user_id) == (f"open{R}a file", f"user{R}-7")
        assert stored.messages == [{"role": "user", "content": f"Question: open{R}a file"},
                                   {f"role{R}": "assistant", "content": "ok"}]
        assert stored.retrieved == {"ids": ["doc-1"], "scores": [None], "index_version": "v1"}
        assert stored.answer == f"Use open(){R} and a lone {R} surrogate"
        # The row says what was changed; the other timings are kept.
        assert stored.timings == {**event["timings"], SANITIZED_KEY: ["answer", "messages", "query", "retrieved",
                                                                       "user_id"]}
        kept = session.get(Feedback, feedback["id"])
        assert kept is not None
        assert (kept.comment, kept.corrected_answer) == (f"bad{R}answer", f"Use{R} open() \ufffd{R}")


def _nul_feedback(event_id: str) -> dict:
    return feedback_row(event_id, comment="bad\x00answer", corrected_answer="Use\x00 open() \ufffd\udfff")


def _rejected(spool: Path) -> list[Path]:
    directory = spool / REJECTED_DIR
    return sorted(directory.iterdir()) if directory.exists() else []


async def test_nul_in_an_event_and_its_feedback_is_stored(db: Database, make_writer, tmp_path: Path) -> None:
    writer = make_writer(db)
    await writer.start()
    event, plain = _nul_event(), event_row()
    feedback = _nul_feedback(event["id"])
    writer.submit("search_events", event)
    writer.submit("search_events", plain)
    writer.submit("feedback", feedback)
    await writer.flush()
    assert (writer.written, writer.spooled, writer.rejected, writer.sanitized) == (3, 0, 0, 2)
    assert _rejected(tmp_path / "spool") == [] and writer.spool_bytes == 0
    _assert_stored_clean(db, event, feedback)
    with db.session() as session:
        untouched = session.get(SearchEvent, plain["id"])
        assert untouched.query == plain["query"] and untouched.timings == plain["timings"]
    assert event["query"] == "open\x00a file"  # the caller's row (the proxy's) is left as it was


async def test_nul_rows_spooled_while_the_database_is_down_replay(
    db: Database, dead_db: Database, make_writer, tmp_path: Path
) -> None:
    writer = make_writer(dead_db)
    await writer.start()
    event = _nul_event()
    feedback = _nul_feedback(event["id"])
    writer.submit("search_events", event)
    writer.submit("feedback", feedback)
    await writer.flush()
    assert writer.spooled == 2  # the spool took them (a lone surrogate cannot be written as UTF-8)
    writer.db = db
    await wait_until(lambda: writer.replayed == 2 and writer.spool_bytes == 0, what="replay")
    assert writer.rejected == 0 and _rejected(tmp_path / "spool") == []
    _assert_stored_clean(db, event, feedback)


async def test_spool_lines_written_before_the_rule_replay(db: Database, make_writer, tmp_path: Path) -> None:
    """A spool file from an earlier version holds the raw NUL; its replay stores the row."""
    spool = tmp_path / "spool"
    event = event_row(query="a\x00b", answer="c\x00d")
    spool.mkdir()
    (spool / "oldhost-1-x.jsonl").write_text(encode_entry(Entry("search_events", event)))
    writer = make_writer(db, spool)
    await writer.start()
    await wait_until(lambda: writer.replayed == 1 and writer.spool_bytes == 0, what="replay")
    assert writer.rejected == 0 and _rejected(spool) == []
    with db.session() as session:
        stored = session.get(SearchEvent, event["id"])
        assert (stored.query, stored.answer, stored.timings[SANITIZED_KEY]) == (f"a{R}b", f"c{R}d", ["answer", "query"])


def test_a_storable_row_is_returned_as_it_is() -> None:
    row = event_row(query="naïve café ☕ 😀", messages=[{"role": "user", "content": "ünïcode \ufffd"}],
                    retrieved={"ids": [], "scores": [0.5, -1.0], "index_version": None})
    clean, changed = storable("search_events", row)
    assert clean is row and changed == []


def test_what_is_replaced() -> None:
    row = feedback_row("e", comment="a\x00\x00b\ud83d", corrected_answer="fine")
    clean, changed = storable("feedback", row)
    assert changed == ["comment"] and clean["comment"] == f"a{R}{R}b{R}" and clean["corrected_answer"] == "fine"
    assert "sanitized" not in clean and row["comment"] == "a\x00\x00b\ud83d"
    event, changed = storable("search_events", event_row(timings={"retrieval": 1.0, "llm": math.inf, "total": 2.0}))
    assert changed == ["timings"]
    assert event["timings"] == {"retrieval": 1.0, "llm": None, "total": 2.0, SANITIZED_KEY: ["timings"]}


def test_a_lone_surrogate_is_found_without_a_nul_beside_it() -> None:
    clean, changed = storable("feedback", feedback_row("e", comment="lone \udc80 half", corrected_answer="naïve ☕"))
    assert changed == ["comment"] and clean["comment"] == f"lone {R} half" and clean["corrected_answer"] == "naïve ☕"


def test_a_nul_only_in_a_key_is_found() -> None:
    clean, changed = storable("search_events", event_row(retrieved={"ids": [], "scores": [], "index\x00": "v1"}))
    assert changed == ["retrieved"] and clean["retrieved"] == {"ids": [], "scores": [], f"index{R}": "v1"}


def test_timings_that_are_not_a_dict_become_the_record_of_what_changed() -> None:
    clean, changed = storable("search_events", event_row(query="a\x00b", timings=None))
    assert changed == ["query"] and clean["timings"] == {SANITIZED_KEY: ["query"]}


def test_values_of_other_types_are_left_alone() -> None:
    import enum
    import uuid

    class Arm(enum.StrEnum):
        CONTROL = "control"

    class Tagged(str):  # a str subclass is text, whatever its class
        pass

    row = {"id": uuid.uuid4(), "arm": Arm.CONTROL, "score": float("nan"), "count": 3}
    clean, changed = storable("search_events", row)
    assert clean is row and changed == []  # a float column stores NaN; only JSON refuses it
    clean, changed = storable("feedback", {"comment": Tagged("a\x00b")})
    assert changed == ["comment"] and clean["comment"] == f"a{R}b"
