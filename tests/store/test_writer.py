"""The batching writer: batched idempotent writes, spooling while the database is down, replay."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError

from store import events
from store import writer as writer_module
from store.db import Database
from store.models import SearchEvent
from store.spool import CLAIM_MARK, REJECTED_DIR, TABLES, Entry, encode_entry
from store.writer import MAX_ROW_ATTEMPTS, EventWriter
from tests.store.conftest import dead_pid, event_row, feedback_row, wait_until


def _spool_files(spool: Path) -> list[Path]:
    return sorted(p for p in spool.iterdir() if p.is_file()) if spool.exists() else []


def _write_spool_file(path: Path, rows: list[tuple[str, dict]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(encode_entry(Entry(table, row)) for table, row in rows))


async def test_2000_rows_arrive_exactly_once(db: Database, make_writer) -> None:
    writer = make_writer(db, batch_size=500)
    await writer.start()
    rows = [event_row(user_id=f"u{i}") for i in range(2000)]
    for row in rows:
        writer.submit("search_events", row)
    assert writer.is_pending(rows[0]["id"])
    await writer.flush()
    assert events.count_events(db) == 2000
    assert (writer.written, writer.spooled, writer.replayed, writer.queue_depth) == (2000, 0, 0, 0)
    assert not any(writer.is_pending(row["id"]) for row in rows)
    assert writer.spool_bytes == 0


async def test_row_values_round_trip(db: Database, make_writer) -> None:
    writer = make_writer(db)
    await writer.start()
    row = event_row(session_id="s-1", prompt_template_version=3, served_arm=None, status="error", error="boom")
    writer.submit("search_events", row)
    await writer.flush()
    with db.session() as session:
        stored = session.get(SearchEvent, row["id"])
        assert stored.messages == row["messages"] and stored.retrieved == row["retrieved"]
        assert (stored.session_id, stored.prompt_template_version, stored.served_arm) == ("s-1", 3, None)
        assert stored.ts == row["ts"] and stored.ts.tzinfo is UTC


async def test_duplicates_neither_duplicate_nor_fail(db: Database, make_writer, tmp_path: Path) -> None:
    writer = make_writer(db)
    await writer.start()
    row = event_row()
    writer.submit("search_events", row)
    await writer.flush()
    writer.submit("search_events", dict(row))  # in a later batch
    twin = event_row()
    writer.submit("search_events", twin)
    writer.submit("search_events", dict(twin))  # in the same batch
    await writer.flush()
    assert events.count_events(db) == 2
    assert writer.spooled == 0 and writer.written == 4
    assert not writer.is_pending(row["id"]) and not writer.is_pending(twin["id"])

    # A spool file holding rows that are already in the database, plus new ones, replays cleanly.
    fresh = [event_row() for _ in range(3)]
    _write_spool_file(
        tmp_path / "spool" / "otherhost-1-x.jsonl",
        [("search_events", r) for r in [row, twin, *fresh, fresh[0]]],
    )
    await wait_until(lambda: writer.spool_bytes == 0, what="spool replayed")
    assert writer.replayed == 6
    assert events.count_events(db) == 5


async def test_feedback_after_its_event_in_the_same_batch(db: Database, make_writer) -> None:
    writer = make_writer(db, flush_interval_s=0.2)
    await writer.start()
    # Feedback submitted first in the queue still lands after its event (events go first in a batch).
    event = event_row()
    writer.submit("feedback", feedback_row(event["id"], rating=2, thumbs="down", corrected_answer="better"))
    writer.submit("search_events", event)
    more = event_row()
    writer.submit("search_events", more)
    writer.submit("feedback", feedback_row(more["id"]))
    await writer.flush()
    assert events.count_events(db) == 2 and events.count_feedback(db) == 2
    assert writer.spooled == 0 and writer.written == 4


async def test_a_refused_row_is_isolated_and_set_aside(db: Database, make_writer, tmp_path: Path, caplog) -> None:
    writer = make_writer(db)
    await writer.start()
    good = [event_row() for _ in range(3)]
    orphan = feedback_row("no-such-event")  # violates the foreign key, forever
    for row in good:
        writer.submit("search_events", row)
    writer.submit("feedback", orphan)
    await writer.flush()
    assert events.count_events(db) == 3  # the good rows of the batch got in
    assert writer.written == 3 and writer.spooled == 1
    assert writer.is_pending(orphan["id"])
    # Retried through the spool a few times, then set aside (kept on disk, not replayed forever).
    await wait_until(lambda: writer.rejected == 1, what="orphan set aside")
    assert not writer.is_pending(orphan["id"])
    assert writer.spool_bytes == 0
    [rejected] = list((tmp_path / "spool" / REJECTED_DIR).iterdir())
    record = json.loads(rejected.read_text().splitlines()[0])
    assert record["row"]["id"] == orphan["id"] and record["attempts"] == MAX_ROW_ATTEMPTS
    assert events.count_feedback(db) == 0
    # Offered to the database exactly MAX_ROW_ATTEMPTS times: once from the batch, then once per replay.
    refusals = [r for r in caplog.records if r.getMessage().startswith(f"feedback row {orphan['id']} refused")]
    assert len(refusals) == MAX_ROW_ATTEMPTS


async def test_feedback_for_an_event_still_in_the_spool(db: Database, dead_db: Database, make_writer) -> None:
    writer = make_writer(dead_db)
    await writer.start()
    event = event_row()
    writer.submit("search_events", event)
    await writer.flush()
    assert writer.spooled == 1 and writer.is_pending(event["id"])
    writer.db = db
    feedback = feedback_row(event["id"])
    writer.submit("feedback", feedback)
    await writer.flush()
    await wait_until(lambda: events.count_feedback(db) == 1 and writer.spool_bytes == 0, what="both replayed")
    assert events.count_events(db) == 1
    assert not writer.is_pending(event["id"]) and not writer.is_pending(feedback["id"])
    assert writer.rejected == 0


async def test_feedback_waits_for_an_event_another_writer_is_still_replaying(
    db: Database, make_writer, tmp_path: Path, caplog
) -> None:
    """Feedback answered 201 whose event another worker sharing the spool is still replaying (a long backlog):
    the foreign key refuses it until then, and those refusals must not get it set aside."""
    caplog.set_level(logging.WARNING, logger="store.writer")
    spool = tmp_path / "spool"
    event = event_row()
    # Claimed by a live worker on another host: its claim is fresh, nobody takes it over.
    replaying = spool / f"otherhost-1-a{CLAIM_MARK}otherhost-7"
    _write_spool_file(replaying, [("search_events", event_row()), ("search_events", event)])
    writer = make_writer(db, spool)
    await writer.start()
    feedback = feedback_row(event["id"])
    writer.submit("feedback", feedback)

    def refusals() -> int:
        return sum(r.getMessage().startswith(f"feedback row {feedback['id']} refused") for r in caplog.records)

    await wait_until(lambda: refusals() >= 2 * MAX_ROW_ATTEMPTS, what="refusals while its event is replayed")
    assert writer.rejected == 0 and not (spool / REJECTED_DIR).exists() and writer.is_pending(feedback["id"])
    # The other worker's replay gets the event in, then removes its file.
    with db.session() as session:
        session.add(SearchEvent(**event))
    replaying.unlink()
    await wait_until(lambda: events.count_feedback(db) == 1 and writer.spool_bytes == 0, what="feedback written")
    assert writer.rejected == 0 and not writer.is_pending(feedback["id"])


async def test_rows_another_writer_replayed_are_not_pending_for_ever(
    db: Database, dead_db: Database, make_writer, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spooling = make_writer(dead_db, spool)  # not started: flush() drains in the caller's task
    row = event_row()
    spooling.submit("search_events", row)
    await spooling.flush()
    assert spooling.spooled == 1 and spooling.is_pending(row["id"])
    replayer = make_writer(db, spool)
    await replayer.start()
    await wait_until(lambda: replayer.replayed == 1 and replayer.spool_bytes == 0, what="replayed by the other")
    spooling.db = db
    await spooling.start()
    await wait_until(lambda: not spooling.is_pending(row["id"]), what="the row no longer pending where it was spooled")


async def test_database_unreachable_spools_then_replays(db: Database, dead_db: Database, make_writer) -> None:
    writer = make_writer(dead_db, batch_size=100)
    await writer.start()
    rows = [event_row() for _ in range(300)]
    for row in rows:
        writer.submit("search_events", row)
    await writer.flush()
    assert writer.spool_bytes > 0
    assert writer.written == 0 and writer.spooled == 300 and writer.queue_depth == 0
    assert all(writer.is_pending(row["id"]) for row in rows)
    # While it is down, new rows go straight to the spool.
    late = event_row()
    writer.submit("search_events", late)
    await writer.flush()
    assert writer.spooled == 301 and writer.is_pending(late["id"])

    writer.db = db  # the database is back
    await wait_until(lambda: writer.replayed == 301, what="replay")
    await wait_until(lambda: writer.spool_bytes == 0, what="spool emptied")
    assert events.count_events(db) == 301
    assert not any(writer.is_pending(row["id"]) for row in [*rows, late])
    # And writing goes straight to the database again.
    after = event_row()
    writer.submit("search_events", after)
    await writer.flush()
    assert writer.written == 1 and events.count_events(db) == 302


async def test_stop_with_the_database_down_spools_and_a_new_writer_replays(
    db: Database, dead_db: Database, make_writer, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    first = make_writer(dead_db, spool, flush_interval_s=5.0)  # stop() must not wait for a fuller batch
    await first.start()
    rows = [event_row() for _ in range(250)]
    for row in rows[:200]:
        first.submit("search_events", row)
    feedback = feedback_row(rows[0]["id"])
    first.submit("feedback", feedback)
    await first.stop()
    # Never started: stop() still spools what was submitted.
    second = make_writer(dead_db, spool)
    for row in rows[200:]:
        second.submit("search_events", row)
    await second.stop()
    assert first.spooled == 201 and second.spooled == 50 and first.queue_depth == second.queue_depth == 0
    assert first.spool_bytes > 0 and len(_spool_files(spool)) == 2
    assert events.count_events(db) == 0

    # "The process restarted": a new writer finds the spool and replays it.
    restarted = make_writer(db, spool)
    await restarted.start()
    await wait_until(lambda: restarted.spool_bytes == 0, what="spool replayed")
    assert restarted.replayed == 251
    assert events.count_events(db) == 250 and events.count_feedback(db) == 1
    assert _spool_files(spool) == []


async def test_stop_without_start_writes_when_the_database_is_up(db: Database, make_writer) -> None:
    writer = make_writer(db)
    writer.submit("search_events", event_row())
    await writer.flush()  # works without start()
    writer.submit("search_events", event_row())
    await writer.stop()
    assert writer.written == 2 and events.count_events(db) == 2


async def test_queue_overflow_goes_to_the_spool(db: Database, make_writer) -> None:
    writer = make_writer(db, max_queue=10)
    rows = [event_row() for _ in range(25)]
    for row in rows:  # not started: nothing drains the queue
        writer.submit("search_events", row)
    assert writer.queue_depth == 10 and writer.spooled == 15 and writer.spool_bytes > 0
    assert all(writer.is_pending(row["id"]) for row in rows)
    await writer.start()
    await writer.flush()
    await wait_until(lambda: writer.spool_bytes == 0, what="overflow replayed")
    assert events.count_events(db) == 25
    assert (writer.written, writer.replayed) == (10, 15)
    assert not any(writer.is_pending(row["id"]) for row in rows)


async def test_stale_claims_are_taken_over(db: Database, make_writer, tmp_path: Path) -> None:
    from store.spool import HOST as host

    spool = tmp_path / "spool"
    dead_rows, ours_rows, live_rows = [event_row()], [event_row()], [event_row()]
    # Claimed by a process that is gone.
    _write_spool_file(spool / f"{host}-1-a{CLAIM_MARK}{host}-{dead_pid()}", [("search_events", r) for r in dead_rows])
    # Claimed under our own pid but by no claim of this process: an earlier process with the same pid.
    _write_spool_file(spool / f"{host}-1-b{CLAIM_MARK}{host}-{os.getpid()}", [("search_events", r) for r in ours_rows])
    # Claimed by a live process (our parent): left alone.
    live = spool / f"{host}-1-c{CLAIM_MARK}{host}-{os.getppid()}"
    _write_spool_file(live, [("search_events", r) for r in live_rows])

    writer = make_writer(db, spool)
    await writer.start()
    await wait_until(lambda: writer.replayed == 2, what="stale claims replayed")
    assert events.count_events(db) == 2
    assert _spool_files(spool) == [live]


async def test_unreadable_spool_lines_are_set_aside(db: Database, make_writer, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    good = event_row()
    path = spool / "h-1-torn.jsonl"
    _write_spool_file(path, [("search_events", good)])
    with path.open("a") as handle:
        handle.write('{"table": "nope", "row": {"id": "x"}}\n{"table": "search_ev')  # a torn last line
    writer = make_writer(db, spool)
    await writer.start()
    await wait_until(lambda: writer.replayed == 1 and writer.spool_bytes == 0, what="replay")
    assert events.count_events(db) == 1
    [rejected] = list((spool / REJECTED_DIR).iterdir())
    assert len(rejected.read_text().splitlines()) == 2


async def test_an_unreadable_line_mid_file_costs_only_itself(db: Database, make_writer, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    before, after = [event_row() for _ in range(2)], [event_row() for _ in range(3)]
    path = spool / "h-1-mid.jsonl"
    _write_spool_file(path, [("search_events", row) for row in before])
    with path.open("a") as handle:
        handle.write("not json at all\n")
        handle.write("".join(encode_entry(Entry("search_events", row)) for row in after))
    writer = make_writer(db, spool, batch_size=2)  # chunks of 2: the bad line falls inside a chunk
    await writer.start()
    await wait_until(lambda: writer.spool_bytes == 0, what="replay")
    assert writer.replayed == 5 and events.count_events(db) == 5
    [rejected] = list((spool / REJECTED_DIR).iterdir())
    assert "not json at all" in rejected.read_text()


async def test_a_row_spooled_by_a_newer_release_waits_for_its_columns_then_goes_in(
    db: Database, make_writer, tmp_path: Path, caplog
) -> None:
    """A rolling deploy: a newer release sharing the spool wrote rows with columns its migration adds. Until the
    database has them the rows stay in the spool (never set aside); then they go in, those columns too."""
    caplog.set_level(logging.WARNING, logger="store.writer")
    spool = tmp_path / "spool"
    newer = event_row(level="debug", seen_at=datetime(2026, 5, 1, 12, tzinfo=UTC))
    _write_spool_file(spool / "newer-1-a.jsonl", [("search_events", newer), ("search_events", event_row())])
    writer = make_writer(db, spool)
    await writer.start()
    await wait_until(lambda: sum(r.getMessage().startswith("kept 1 spooled") for r in caplog.records)
                     > MAX_ROW_ATTEMPTS, what="replays without the columns")
    assert writer.rejected == 0 and not (spool / REJECTED_DIR).exists() and writer.spool_bytes > 0
    assert events.count_events(db) == 1 and not events.event_exists(db, newer["id"])

    timestamp = "TIMESTAMP WITH TIME ZONE" if db.engine.dialect.name == "postgresql" else "DATETIME"
    with db.engine.begin() as connection:  # the newer release's migration
        connection.execute(text("ALTER TABLE search_events ADD COLUMN level TEXT"))
        connection.execute(text(f"ALTER TABLE search_events ADD COLUMN seen_at {timestamp}"))
    await wait_until(lambda: writer.spool_bytes == 0, what="the row replayed with its columns")
    with db.engine.connect() as connection:
        level, seen_at = connection.execute(
            text("SELECT level, seen_at FROM search_events WHERE id = :id"), {"id": newer["id"]}
        ).one()
    assert level == "debug" and seen_at is not None and writer.rejected == 0


async def test_a_newer_releases_event_goes_in_before_its_feedback(
    db: Database, make_writer, tmp_path: Path, caplog
) -> None:
    """Mid-deploy, a newer release's event has the column its migration added and its feedback does not: the
    replay writes the event first (one transaction), so the feedback is not refused for want of it."""
    caplog.set_level(logging.WARNING, logger="store.writer")
    with db.engine.begin() as connection:  # the newer release's migration
        connection.execute(text("ALTER TABLE search_events ADD COLUMN level TEXT"))
    spool = tmp_path / "spool"
    event = event_row(level="debug")
    feedback = feedback_row(event["id"])
    _write_spool_file(spool / "newer-1-a.jsonl", [("search_events", event), ("feedback", feedback)])
    writer = make_writer(db, spool)
    claimed = writer._spool.claim(spool / "newer-1-a.jsonl")
    outcome = await asyncio.to_thread(writer._replay_claimed, db, claimed)
    assert outcome.ok and sorted(outcome.replayed_ids) == sorted([event["id"], feedback["id"]])
    assert not [r for r in caplog.records if "refused" in r.getMessage()]
    assert [p.name for p in _spool_files(spool)] == [claimed.name]  # nothing went back to the spool
    assert events.event_exists(db, event["id"])


async def test_a_replayed_file_looks_up_the_databases_columns_once(
    db: Database, make_writer, tmp_path: Path, monkeypatch
) -> None:
    """A backlog of a newer release's rows, many chunks: one look at the database's columns, not one a chunk."""
    with db.engine.begin() as connection:
        connection.execute(text("ALTER TABLE search_events ADD COLUMN level TEXT"))
    looks = []
    real = writer_module._widened
    monkeypatch.setattr(writer_module, "_widened", lambda *args: looks.append(args) or real(*args))
    spool = tmp_path / "spool"
    rows = [event_row(level="debug") for _ in range(6)]
    _write_spool_file(spool / "newer-1-a.jsonl", [("search_events", row) for row in rows])
    writer = make_writer(db, spool, batch_size=2)
    claimed = writer._spool.claim(spool / "newer-1-a.jsonl")
    outcome = await asyncio.to_thread(writer._replay_claimed, db, claimed)
    assert outcome.ok and outcome.replayed == 6 and events.count_events(db) == 6
    assert len(looks) == 1


async def test_rows_kept_for_columns_the_database_never_gets_are_set_aside_after_a_day(
    db: Database, make_writer, tmp_path: Path, caplog, monkeypatch
) -> None:
    """A deploy rolled back: the newer release's rows wait in the spool (one warning a replayed file, not one a
    chunk) until KEEP_FOR_NEWER_COLUMNS_S after their first keep, then go to rejected/, kept for an operator."""
    caplog.set_level(logging.WARNING, logger="store.writer")
    clock = [1_000_000.0]
    monkeypatch.setattr(writer_module, "_now", lambda: clock[0])
    spool = tmp_path / "spool"
    rows = [event_row(level="debug") for _ in range(3)]
    _write_spool_file(spool / "newer-1-a.jsonl", [("search_events", row) for row in rows])
    writer = make_writer(db, spool, batch_size=2)

    await writer._replay_round()
    assert [r.getMessage()[:14] for r in caplog.records] == ["kept 3 spooled"]
    [kept] = _spool_files(spool)
    assert [json.loads(line)["kept_since"] for line in kept.read_text().splitlines()] == [clock[0]] * 3

    clock[0] += writer_module.KEEP_FOR_NEWER_COLUMNS_S - 1
    await writer._replay_round()  # not yet: still kept, since the first keep
    assert writer.rejected == 0 and not (spool / REJECTED_DIR).exists()

    clock[0] += 1
    caplog.clear()
    await writer._replay_round()
    assert writer.rejected == 3 and writer.spool_bytes == 0
    [rejected] = list((spool / REJECTED_DIR).iterdir())
    assert [json.loads(line)["row"]["id"] for line in rejected.read_text().splitlines()] == [r["id"] for r in rows]
    [given_up] = [r for r in caplog.records if "kept over 24 h" in r.getMessage()]
    assert given_up.levelno == logging.ERROR and "level" in given_up.getMessage()


async def test_the_database_is_seen_back_while_rows_wait_for_newer_columns(
    db: Database, make_writer, tmp_path: Path
) -> None:
    """A spool file that only holds rows kept for newer columns writes nothing: the writer still sees the
    database back after an outage, instead of spooling everything for as long as that file waits."""
    spool = tmp_path / "spool"
    _write_spool_file(spool / "newer-1-a.jsonl", [("search_events", event_row(level="debug"))])
    writer = make_writer(db, spool)
    writer._db_down = True
    await writer._replay_round()
    assert not writer._db_down and writer.spool_bytes > 0


async def test_set_aside_rows_are_counted_across_files(db: Database, make_writer, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    for name in ("h-1-a.jsonl", "h-1-b.jsonl"):  # each an orphan on its last attempt
        (spool / name).parent.mkdir(parents=True, exist_ok=True)
        (spool / name).write_text(encode_entry(Entry("feedback", feedback_row("no-such-event"),
                                                     attempts=MAX_ROW_ATTEMPTS - 1)))
    writer = make_writer(db, spool)
    await writer.start()
    await wait_until(lambda: writer.spool_bytes == 0, what="both files replayed")
    assert writer.rejected == 2 and writer.replayed == 0


async def test_a_row_submitted_twice_is_pending_until_both_are_booked(db: Database, make_writer) -> None:
    """A client retrying with the same event id: the row is pending while any copy is queued or in flight."""
    slow = CountingDatabase(db, delay_s=0.5)
    writer = make_writer(slow, batch_size=1)
    await writer.start()
    row = event_row()
    writer.submit("search_events", row)
    writer.submit("search_events", dict(row))
    await wait_until(lambda: writer.written == 1, what="the first copy written")
    assert writer.is_pending(row["id"])  # the second copy is in its (0.5 s) write
    await writer.flush()
    assert writer.written == 2 and not writer.is_pending(row["id"]) and events.count_events(db) == 1


async def test_submit_validates(db: Database, make_writer) -> None:
    writer = make_writer(db)
    with pytest.raises(ValueError):
        writer.submit("nope", event_row())
    with pytest.raises(ValueError):
        writer.submit("search_events", {"ts": datetime.now(UTC)})
    with pytest.raises(ValueError):
        writer.submit("search_events", event_row(not_a_column=1))
    assert writer.queue_depth == 0
    assert set(TABLES) == {"search_events", "feedback"}


async def test_spool_lines_are_json_with_iso_datetimes(dead_db: Database, make_writer, tmp_path: Path) -> None:
    writer = make_writer(dead_db)
    row = event_row()
    writer.submit("search_events", row)
    await writer.stop()
    [path] = _spool_files(tmp_path / "spool")
    assert path.name.endswith(".jsonl") and f"-{os.getpid()}-" in path.name
    [line] = path.read_text().splitlines()
    record = json.loads(line)
    assert record["table"] == "search_events" and record["row"]["id"] == row["id"]
    assert datetime.fromisoformat(record["row"]["ts"]) == row["ts"]


async def test_default_options_write_rows(db: Database, tmp_path: Path) -> None:
    writer = EventWriter(db, tmp_path / "spool-defaults")
    await writer.start()
    try:
        row = event_row()
        writer.submit("search_events", row)
        await writer.flush()
    finally:
        await writer.stop()
    with db.session() as session:
        assert session.scalar(select(SearchEvent.query).where(SearchEvent.id == row["id"])) == row["query"]


async def test_replay_while_another_writer_keeps_spooling(
    db: Database, dead_db: Database, make_writer, tmp_path: Path
) -> None:
    """Two replicas on one spool directory: one spooling (its database is down), one replaying its files."""
    spool = tmp_path / "spool"
    spooling = make_writer(dead_db, spool, batch_size=25, replay_interval_s=3600)
    replaying = make_writer(db, spool, replay_interval_s=0.005, batch_size=40)
    await spooling.start()
    await replaying.start()
    total = 0
    for _burst in range(40):
        for _ in range(25):
            spooling.submit("search_events", event_row())
            total += 1
        await spooling.flush()
    await spooling.stop()
    assert spooling.spooled == total
    await wait_until(lambda: replaying.spool_bytes == 0, timeout=30, what="spool drained")
    assert events.count_events(db) == total
    assert replaying.replayed == total


class HangingDatabase:
    """A database whose connections hang (packets black-holed) until released, then fail."""

    def __init__(self) -> None:
        self.released = threading.Event()

    @property
    def engine(self) -> HangingDatabase:
        return self

    def begin(self):
        self.released.wait(30)
        raise OperationalError("INSERT", {}, ConnectionError("timed out"))

    def ping(self) -> bool:
        return False


async def test_a_hung_database_does_not_hold_rows_in_memory(db: Database, make_writer) -> None:
    hung = HangingDatabase()
    writer = make_writer(hung, write_timeout_s=0.2)
    try:
        await writer.start()
        rows = [event_row() for _ in range(20)]
        for row in rows:
            writer.submit("search_events", row)
        await writer.flush()  # returns: the hung batch timed out and was spooled
        assert writer.spooled == 20 and writer.queue_depth == 0 and writer.spool_bytes > 0
        assert all(writer.is_pending(row["id"]) for row in rows)
    finally:
        hung.released.set()
    writer.db = db
    await wait_until(lambda: writer.spool_bytes == 0, what="replay after the hang")
    assert events.count_events(db) == 20 and writer.replayed == 20
    assert not any(writer.is_pending(row["id"]) for row in rows)


async def test_spooling_does_not_wait_behind_database_calls_that_hang(make_writer) -> None:
    """Hung database calls (timed-out writes left running, a replay, the feedback route's lookups) can hold every
    thread of asyncio's default pool; an append to the spool queued behind them kept flush() and stop() from
    returning, and the rows were lost when the process was killed."""
    hung = HangingDatabase()
    writer = make_writer(hung, write_timeout_s=0.2)
    held = threading.Event()
    loop = asyncio.get_running_loop()
    holders = [loop.run_in_executor(None, held.wait, 30) for _ in range(32)]  # the default pool's most threads
    try:
        await writer.start()
        rows = [event_row() for _ in range(5)]
        for row in rows:
            writer.submit("search_events", row)
        await asyncio.wait_for(writer.flush(), 5)
        assert writer.spooled == 5 and writer.queue_depth == 0
        writer.submit("search_events", event_row())
        await asyncio.wait_for(writer.stop(), 5)
        assert writer.spooled == 6 and writer.queue_depth == 0
    finally:
        held.set()
        hung.released.set()
        await asyncio.gather(*holders)


class CountingDatabase:
    """A real database behind a switch, counting transactions (`calls`): while `down`, for the next `fail_next`
    and after the first `up_for` every transaction fails; each begins `delay_s` late (a loaded server)."""

    def __init__(self, db: Database, *, down: bool = False, fail_next: int = 0, up_for: int | None = None,
                 delay_s: float = 0.0) -> None:
        self.db, self.down, self.fail_next, self.up_for, self.delay_s = db, down, fail_next, up_for, delay_s
        self.calls = 0

    @property
    def engine(self) -> CountingDatabase:
        return self

    def begin(self):
        self.calls += 1
        time.sleep(self.delay_s)
        failing = self.down or self.fail_next > 0 or (self.up_for is not None and self.calls > self.up_for)
        self.fail_next = max(0, self.fail_next - 1)
        if failing:
            raise OperationalError("INSERT", {}, ConnectionError("connection refused"))
        return self.db.engine.begin()

    def ping(self) -> bool:
        return not self.down and self.up_for is None


class GatedDatabase(CountingDatabase):
    """A real database whose transactions wait at a gate (a black-holed connection) until it opens."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.entered, self.gate = threading.Event(), threading.Event()

    def begin(self):
        self.entered.set()
        self.gate.wait(30)
        return super().begin()


async def test_stop_abandons_a_replay_stuck_in_the_database(db: Database, make_writer, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    _write_spool_file(spool / "h-1-stuck.jsonl", [("search_events", event_row()) for _ in range(3)])
    gated = GatedDatabase(db)
    writer = make_writer(gated, spool, write_timeout_s=0.3)
    await writer.start()
    try:
        await asyncio.to_thread(gated.entered.wait, 10)  # the replay is inside a transaction that hangs
        await asyncio.wait_for(writer.stop(), 10)  # returns after write_timeout_s, not when the database does
    finally:
        gated.gate.set()
    await wait_until(lambda: gated.calls == 1, what="the abandoned transaction to go through")
    await asyncio.sleep(0.2)
    # Abandoned, not finished behind stop()'s back: nothing booked, the (claimed) file left for a restart.
    assert writer.replayed == 0 and len(_spool_files(spool)) == 1


async def test_a_replay_that_fails_part_way_gives_the_file_back_whole(db: Database, make_writer, tmp_path: Path):
    spool = tmp_path / "spool"
    rows = [event_row() for _ in range(5)]
    path = spool / "h-1-replayed.jsonl"
    _write_spool_file(path, [("search_events", row) for row in rows])
    original = path.read_bytes()
    flaky = CountingDatabase(db, up_for=1)  # the connection drops after the first transaction
    writer = make_writer(flaky, spool, batch_size=2)  # chunks of 2, 2, 1: the second one fails
    await writer.start()
    await wait_until(lambda: flaky.calls >= 3, what="a failed replay and a retry")
    await writer.stop()
    assert _spool_files(spool) == [path] and path.read_bytes() == original  # its own name, every line
    assert events.count_events(db) == 2 and writer.replayed == 0  # the first chunk got in; nothing booked

    restarted = make_writer(db, spool)
    await restarted.start()
    await wait_until(lambda: restarted.spool_bytes == 0, what="the given-back file replayed")
    assert events.count_events(db) == 5 and restarted.replayed == 5  # the first two again, ignored as present


def test_a_claim_given_back_beside_a_new_file_of_its_name_keeps_both(tmp_path: Path) -> None:
    from store.spool import Spool

    spool = Spool(tmp_path)
    path = tmp_path / "h-1-x.jsonl"
    path.write_text("old\n")
    claimed = spool.claim(path)
    assert claimed is not None and claimed.name.startswith("h-1-x" + CLAIM_MARK) and not path.exists()
    path.write_text("new\n")  # the name is taken again meanwhile
    spool.unclaim(claimed)
    spool.release(claimed)
    files = _spool_files(tmp_path)
    assert len(files) == 2 and path in files and not claimed.exists()
    (renamed,) = (f for f in files if f != path)
    assert renamed.name.startswith("h-1-x~") and renamed.name.endswith(".jsonl")
    assert (path.read_text(), renamed.read_text()) == ("new\n", "old\n")
    assert spool.claimable() == sorted(files, key=lambda f: (f.stat().st_mtime, f.name))


async def test_an_outage_is_not_held_against_the_rows(
    db: Database, dead_db: Database, make_writer, tmp_path: Path, caplog
) -> None:
    """Rows are set aside after MAX_ROW_ATTEMPTS refusals of their own; replays into a database that is down
    are no refusal, however many there are."""
    caplog.set_level(logging.WARNING, logger="store.writer")
    spool = tmp_path / "spool"
    writer = make_writer(dead_db, spool, replay_interval_s=0.01)
    await writer.start()
    rows = [event_row() for _ in range(3)]
    for row in rows:
        writer.submit("search_events", row)
    await writer.flush()
    await wait_until(lambda: sum("will retry" in r.getMessage() for r in caplog.records) >= 3 * MAX_ROW_ATTEMPTS,
                     what="failed replays")  # each claims the file, fails and gives it back
    await writer.stop()
    assert not (spool / REJECTED_DIR).exists() and writer.rejected == 0
    assert all("attempts" not in json.loads(line) for p in _spool_files(spool) for line in p.read_text().splitlines())
    restarted = make_writer(db, spool)
    await restarted.start()
    await wait_until(lambda: restarted.spool_bytes == 0, what="replay after the outage")
    assert events.count_events(db) == 3 and restarted.rejected == 0


@pytest.fixture
def blocked_spool(tmp_path: Path) -> Path:
    """A spool directory that cannot be created: a file has its name."""
    path = tmp_path / "not-a-directory"
    path.write_text("a file where the spool directory should be\n")
    return path


async def test_with_the_database_and_the_spool_both_failing_rows_wait_in_memory(
    db: Database, dead_db: Database, make_writer, blocked_spool: Path, caplog
) -> None:
    """The last line of defence: a row that can be neither written nor spooled stays queued while the writer
    runs, and is written to the log whole (CRITICAL "UNWRITTEN") if the writer must stop."""
    writer = make_writer(dead_db, blocked_spool)  # never started: flush() drains in the caller's task
    kept = event_row()
    writer.submit("search_events", kept)
    await writer.flush()
    assert writer.queue_depth == 1 and writer.is_pending(kept["id"]) and writer.spooled == 0
    writer.db = db
    await writer.flush()
    assert writer.written == 1 and events.count_events(db) == 1 and not writer.is_pending(kept["id"])

    writer.db = dead_db
    last = event_row()
    writer.submit("search_events", last)
    with caplog.at_level(logging.CRITICAL, logger="store.writer"):
        await writer.stop()
    (record,) = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    line = record.getMessage().removeprefix("UNWRITTEN ")
    assert json.loads(line)["row"]["id"] == last["id"] and writer.queue_depth == 0
    assert not writer.is_pending(last["id"])  # given up on, and said so: not "pending" for ever


async def test_a_running_writer_without_a_spool_writes_once_the_database_is_back(
    db: Database, dead_db: Database, make_writer, blocked_spool: Path, caplog
) -> None:
    writer = make_writer(dead_db, blocked_spool)
    await writer.start()
    row = event_row()
    writer.submit("search_events", row)
    await wait_until(lambda: any("could not spool" in r.getMessage() for r in caplog.records), what="spool failure")
    assert writer.queue_depth == 1 and writer.is_pending(row["id"])
    with pytest.raises(TimeoutError):  # flush() promises written or spooled: neither has happened
        await asyncio.wait_for(writer.flush(), 0.5)
    writer.db = db
    await wait_until(lambda: events.count_events(db) == 1, what="the row written after the outage")
    await wait_until(lambda: not writer.is_pending(row["id"]), what="the row booked")
    assert writer.written == 1 and writer.queue_depth == 0



async def test_a_flush_cancelled_in_the_tick_it_is_woken_is_cancelled(db: Database, make_writer) -> None:
    """The hang `.ci/run` once met in the test above (600 s): on Python 3.11 a `wait_for` inside flush(), whose
    wait ended in the very tick the caller cancelled flush(), swallowed the cancellation, and flush() went on
    waiting for rows a slow or dead database had not taken. Here a write takes 3 s: flush() polls meanwhile."""
    writer = make_writer(CountingDatabase(db, delay_s=3.0))
    await writer.start()
    writer.submit("search_events", event_row())
    flushing = asyncio.ensure_future(writer.flush())
    await asyncio.sleep(0.2)  # the batch is in its write, flush() waits on the writer's progress event
    writer._progress.set()  # woken (as by another batch's progress) in the tick that the caller gives up
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(flushing, 2.0)  # not after the 3 s write, as a flush() that went on would

async def test_flush_does_not_wait_out_the_linger_but_a_full_batch_goes_at_once(db: Database, make_writer) -> None:
    writer = make_writer(db, flush_interval_s=60.0, batch_size=3)  # a linger no test would sit through
    await writer.start()
    writer.submit("search_events", event_row())
    await asyncio.wait_for(writer.flush(), 10)  # a waiting flush() cuts the linger short
    assert events.count_events(db) == 1
    for _ in range(3):
        writer.submit("search_events", event_row())
    await wait_until(lambda: events.count_events(db) == 4, what="a full batch written without a flush")


async def test_rows_that_arrive_within_the_linger_share_one_transaction(db: Database, make_writer) -> None:
    counting = CountingDatabase(db)
    writer = make_writer(counting, flush_interval_s=1.0, batch_size=100)
    await writer.start()
    for _ in range(3):
        writer.submit("search_events", event_row())
        await asyncio.sleep(0.01)  # each after the first has begun to linger
    await wait_until(lambda: events.count_events(db) == 3, what="the batch written after the linger")
    assert counting.calls == 1


async def test_flush_waits_through_a_slow_write(db: Database, make_writer) -> None:
    writer = make_writer(CountingDatabase(db, delay_s=1.2))  # longer than flush()'s 0.5 s wait for progress
    await writer.start()
    writer.submit("search_events", event_row())
    await writer.flush()
    assert events.count_events(db) == 1 and writer.written == 1


async def test_a_failure_that_passes_is_retried_not_spooled(db: Database, make_writer) -> None:
    flaky = CountingDatabase(db, fail_next=1)
    writer = make_writer(flaky, max_retries=2)
    await writer.start()
    writer.submit("search_events", event_row())
    await writer.flush()
    assert (writer.written, writer.spooled, flaky.calls) == (1, 0, 2)


async def test_once_retries_are_spent_rows_go_straight_to_the_spool_until_the_database_answers(
    db: Database, make_writer
) -> None:
    switch = CountingDatabase(db, down=True)
    writer = make_writer(switch, max_retries=2, replay_interval_s=3600)  # no replay round to ping it back
    await writer.start()
    writer.submit("search_events", event_row())
    await writer.flush()
    assert (writer.spooled, switch.calls) == (1, 3)  # one try and two retries
    for _ in range(5):
        writer.submit("search_events", event_row())
        await writer.flush()
    assert (writer.spooled, switch.calls) == (6, 3)  # not one more attempt on a database known to be down


async def test_a_refused_row_is_spooled_with_one_attempt_counted(db: Database, make_writer, tmp_path: Path) -> None:
    writer = make_writer(db, replay_interval_s=3600)  # the replay loop looks once, at start, then waits
    await writer.start()
    orphan = feedback_row("no-such-event")
    writer.submit("feedback", orphan)
    await writer.flush()
    (path,) = _spool_files(tmp_path / "spool")
    (line,) = path.read_text().splitlines()
    assert json.loads(line)["attempts"] == 1 and writer.spooled == 1 and writer.is_pending(orphan["id"])


def _fail_first_batch(writer: EventWriter) -> list[int]:
    """Make the writer's first batch raise as a bug would; returns the sizes of the batches it processes."""
    process, calls = writer._process, []

    async def fails_once(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("an unforeseen bug")
        return await process(batch)

    writer._process = fails_once
    return calls


async def test_a_bug_while_writing_a_batch_costs_a_retry_not_the_rows(db: Database, make_writer) -> None:
    writer = make_writer(db)
    calls = _fail_first_batch(writer)
    await writer.start()
    row = event_row()
    writer.submit("search_events", row)
    await asyncio.wait_for(writer.flush(), 10)
    assert calls == [1, 1] and writer.written == 1 and events.count_events(db) == 1
    assert not writer.is_pending(row["id"])


async def test_a_bug_while_draining_without_the_flush_task_keeps_the_rows(db: Database, make_writer) -> None:
    writer = make_writer(db)  # never started: flush() writes from the caller's task
    calls = _fail_first_batch(writer)
    row = event_row()
    writer.submit("search_events", row)
    await writer.flush()
    assert writer.queue_depth == 1 and writer.is_pending(row["id"])  # kept for the next try
    await writer.flush()
    assert calls == [1, 1] and writer.written == 1 and events.count_events(db) == 1
