"""Read helpers over the logged events."""

from __future__ import annotations

from store import events
from store.db import Database
from tests.store.conftest import event_row, feedback_row


async def test_event_helpers(db: Database, make_writer) -> None:
    writer = make_writer(db)
    a, b, c = event_row(experiment_id="e1"), event_row(experiment_id="e1"), event_row(experiment_id="e2")
    for row in (a, b, c):
        writer.submit("search_events", row)
    writer.submit("feedback", feedback_row(a["id"]))
    await writer.flush()

    assert events.event_exists(db, a["id"]) and not events.event_exists(db, "nope")
    assert events.count_events(db) == 3
    assert events.count_events(db, "e1") == 2
    assert events.count_events(db, "e3") == 0
    assert events.count_feedback(db) == 1
