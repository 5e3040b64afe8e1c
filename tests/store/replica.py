"""What a proxy replica does to the store as it starts, run in a child process by test_concurrent_start."""

from __future__ import annotations

from typing import Any


def start(url: str, barrier: Any, results: Any) -> None:
    """Wait for the others, then migrate and read (or create) the active prompt template, like a proxy."""
    from store import prompts
    from store.db import Database

    db = Database(url)
    try:
        barrier.wait(timeout=120)
        db.migrate()
        results.put(("ok", prompts.active(db).id))
    except Exception as exc:  # reported to the test, which shows it
        results.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        db.dispose()
