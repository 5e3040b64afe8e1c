"""The batching event writer: writes from the request path go through it, off the hot path, never lost.

`submit()` only appends to an in-memory queue. A background task takes batches off the queue and
writes each in one transaction in a worker thread, with `INSERT .. ON CONFLICT (id) DO NOTHING`, so
a retry or a replay is idempotent. A batch the database will not take (after retries with
exponential backoff) is appended to a spool file (JSON lines, fsynced); a replay loop claims spool
files by atomic rename and inserts their rows once the database is back. A row the database
rejects on its own (a constraint, a bad value) is isolated from its batch, retried through the
spool a few times and then set aside under `<spool_dir>/rejected/` for an operator: kept, never
blocking the other rows. Feedback refused for want of its event is not set aside while that event
is still on its way (in any spool file: another worker may be replaying it). A spooled row with
columns this release does not know (a newer one wrote it, mid-deploy) goes in with them where the
database has them, and otherwise stays in the spool, for a day (a deploy rolled back: then it is set aside). Values
PostgreSQL (or any UTF-8 encoder) cannot take, NUL, lone surrogates and NaN in JSON, are replaced as
a row is submitted (`store.sanitize`), on both databases, so they never cost a row.

The spool files themselves (their format, naming, appends and claims) are `store.spool`'s.

Why not a library (judged 2026-11, issue 11): persist-queue (file queue, SQLiteAckQueue),
diskcache's Deque and litequeue were compared with what this module and `store.spool` must do.
None batches into our own SQL database, so the queue, batching, retries, row isolation and
`is_pending` stay ours whatever holds the spool; only `store.spool` (~300 lines) could go. Against
that: persist-queue documents thread safety, not several processes on one queue (uvicorn
`--workers` share a SPOOL_DIR), pickles by default, and its ack queue, when opened, makes every
unacked item ready again, a live process's too; diskcache's Deque pops without an
acknowledgement, so a crash between pop and commit loses the row (and peek-then-pop races between
processes); litequeue has the right model (ready/locked/done/failed) but needs Python 3.12 (we
run 3.11) and is 0.x with a yanked release. The SQLite-backed ones also hide the rows from an
operator, who can read and fix the JSON lines of `rejected/` by hand. Throughput is no reason
either: the spool is the cold path (written only while the database refuses), and on this
project's loaded 2-core box 20,000 rows went in at ~10,000 rows/s (SQLite) and ~6,000 rows/s
(PostgreSQL) end to end, were spooled with fsync at ~17,000 rows/s and replayed at ~6,000 rows/s.
Verdict: keep it; revisit if the spool must span hosts (then a broker, not a file queue) or
litequeue supports 3.11.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Column, DateTime, MetaData, Table, select
from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect as sa_inspect

from store.db import Database, insert_ignoring
from store.sanitize import storable
from store.spool import COLUMNS, TABLES, Entry, Spool, decode_entry, encode_entry, newer_columns

log = logging.getLogger(__name__)

# Insert order inside a transaction: feedback has a foreign key to search_events.
_TABLE_ORDER = {name: position for position, name in enumerate(TABLES)}

# A row kept in the spool for columns the database lacks (a newer release's, `_split_newer`) waits this long
# from its first keep for a release or a schema that has them, then is set aside under rejected/ (kept there for
# an operator): a deploy rolled back must not leave it re-read, re-appended and warned about for ever, with a
# spool that never empties (which `_forget_replayed_elsewhere` waits for).
KEEP_FOR_NEWER_COLUMNS_S = 24 * 3600.0
_now = time.time  # wall clock: a keep's start is spooled and read by other processes; a test's to replace

MAX_ROW_ATTEMPTS = 5  # a row the database refuses this many times is set aside, not retried forever
# ... unless the refusal is a feedback row's foreign key and its event is still on its way (in a spool
# file, anyone's, or in the database by now): that refusal is not held against it (`_awaiting_their_event`).


class _WriteFailed(Exception):
    """The database (not a row) failed; `written` made it in before, `remaining` did not."""

    def __init__(self, written: list[Entry], bad: list[Entry], remaining: list[Entry], cause: BaseException):
        super().__init__(str(cause))
        self.written, self.bad, self.remaining, self.cause = written, bad, remaining, cause


@dataclass
class _ReplayOutcome:
    ok: bool = False
    replayed: int = 0
    replayed_ids: list[str] = field(default_factory=list)
    rejected_ids: list[str] = field(default_factory=list)


# --- SQL -------------------------------------------------------------------------------------------

# The model's table widened with the columns a newer release spooled, as the database has them; None where it
# lacks one. Keyed by (table, those columns) (`_split_newer`).
_Widened = dict[tuple[str, frozenset[str]], Table | None]
_NONE_WIDENED: _Widened = {}  # never written to: rows of this release's columns only


def _insert(connection, entries: list[Entry], widened: _Widened = _NONE_WIDENED) -> None:
    """Insert in one transaction: search_events first, rows with the same columns in one executemany.

    A row with columns this release does not know goes through its table as `widened` has it (`_split_newer`).
    """
    groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for entry in sorted(entries, key=lambda e: _TABLE_ORDER[e.table]):
        groups.setdefault((entry.table, tuple(sorted(entry.row))), []).append(entry.row)
    dialect = connection.dialect.name
    for (table, columns), rows in groups.items():
        connection.execute(insert_ignoring(dialect, _table_for(widened, table, columns)), rows)


def _table_for(widened: _Widened, table: str, columns: tuple[str, ...]) -> Table:
    newer = frozenset(columns) - COLUMNS[table]
    wide = widened.get((table, newer)) if newer else None
    return TABLES[table] if wide is None else wide


def _is_row_error(exc: BaseException) -> bool:
    """True when the rows are at fault (constraint, bad value), not the database being unavailable."""
    if isinstance(exc, sa_exc.IntegrityError | sa_exc.DataError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        return False  # OperationalError, ProgrammingError (schema missing), InterfaceError, ...
    return isinstance(exc, sa_exc.StatementError | sa_exc.CompileError | TypeError | ValueError)


def _is_missing_event(exc: BaseException) -> bool:
    """A foreign-key violation: the row's event is not in the database (yet)."""
    cause = getattr(exc, "orig", None)
    return (
        getattr(cause, "sqlstate", None) == "23503"  # PostgreSQL's foreign_key_violation (psycopg)
        or getattr(cause, "sqlite_errorname", None) == "SQLITE_CONSTRAINT_FOREIGNKEY"
    )


def _stored_events(db: Database, event_ids: set[str]) -> set[str]:
    """Which of `event_ids` are in the database. Blocking."""
    if not event_ids:
        return set()
    table = TABLES["search_events"]
    with db.engine.connect() as connection:
        return set(connection.scalars(select(table.c.id).where(table.c.id.in_(sorted(event_ids)))))


def _write_entries(
    db: Database, entries: list[Entry], widened: _Widened = _NONE_WIDENED
) -> tuple[list[Entry], list[Entry]]:
    """Write entries; returns (written, refused rows). Raises _WriteFailed when the database fails.

    Blocking: runs in a worker thread. One transaction for the batch; if a row spoils it, each row
    is retried in its own transaction so the good ones get in and the bad ones are isolated.
    """
    try:
        with db.engine.begin() as connection:
            _insert(connection, entries, widened)
        return entries, []
    except Exception as exc:
        if not _is_row_error(exc):
            raise _WriteFailed([], [], entries, exc) from exc
        log.warning("a batch of %d rows was refused (%s); writing them one by one", len(entries), exc)
    written: list[Entry] = []
    bad: list[Entry] = []
    ordered = sorted(entries, key=lambda e: _TABLE_ORDER[e.table])
    for position, entry in enumerate(ordered):
        try:
            with db.engine.begin() as connection:
                _insert(connection, [entry], widened)
            written.append(entry)
        except Exception as exc:
            if not _is_row_error(exc):
                raise _WriteFailed(written, bad, ordered[position:], exc) from exc
            log.warning("%s row %s refused: %s", entry.table, entry.row.get("id"), exc)
            entry.missing_event = _is_missing_event(exc)
            bad.append(entry)
    return written, bad


def _split_newer(db: Database, entries: list[Entry], widened: _Widened) -> tuple[list[Entry], list[Entry]]:
    """(writable, kept): rows a newer release spooled, with columns this one does not know, are writable where
    the database has those columns (that release migrated it), through the table `widened` gets for them; where
    it does not, they are kept, to go back to the spool for a release or a schema that has them. Blocking.
    """
    writable: list[Entry] = []
    kept: list[Entry] = []
    for entry in entries:
        names = newer_columns(entry)
        if names:
            key = (entry.table, names)
            if key not in widened:
                widened[key] = _widened(db, entry.table, names)
            if widened[key] is None:
                kept.append(entry)
                continue
            _parse_datetimes(entry, widened[key], names)
        writable.append(entry)
    return writable, kept


def _past_keeping(kept: list[Entry], now: float) -> tuple[list[Entry], list[Entry]]:
    """(still waiting, overdue): `kept` stamped with their first keep, split at KEEP_FOR_NEWER_COLUMNS_S."""
    waiting: list[Entry] = []
    overdue: list[Entry] = []
    for entry in kept:
        entry.kept_since = entry.kept_since or now
        (overdue if now - entry.kept_since >= KEEP_FOR_NEWER_COLUMNS_S else waiting).append(entry)
    return waiting, overdue


def _log_kept(waiting: list[Entry], overdue: list[Entry]) -> None:
    """One line each for a replayed file's rows kept for newer columns and those given up on, not one a chunk."""
    if waiting:
        log.warning("kept %d spooled rows whose columns the database lacks (a newer release's?): %s",
                    len(waiting), _newer_names(waiting))
    if overdue:
        log.error("setting aside %d spooled rows kept over %.0f h for columns the database still lacks: %s",
                  len(overdue), KEEP_FOR_NEWER_COLUMNS_S / 3600, _newer_names(overdue))


def _newer_names(entries: list[Entry]) -> list[str]:
    return sorted({name for entry in entries for name in newer_columns(entry)})


def _widened(db: Database, table: str, names: frozenset[str]) -> Table | None:
    """The model's `table` plus the columns `names` as the database has them; None when it lacks one."""
    with db.engine.connect() as connection:
        found = {column["name"]: column["type"] for column in sa_inspect(connection).get_columns(table)}
    if not names <= found.keys():
        return None
    wide = TABLES[table].to_metadata(MetaData())
    for name in sorted(names):
        wide.append_column(Column(name, found[name]))
    return wide


def _parse_datetimes(entry: Entry, wide: Table, names: frozenset[str]) -> None:
    # Spooled as ISO strings, as the known datetime columns are (store.spool.decode_entry).
    for name in names:
        value = entry.row[name]
        if isinstance(wide.c[name].type, DateTime) and isinstance(value, str):
            with contextlib.suppress(ValueError):  # left as it is, the database judges it: a row's refusal
                entry.row[name] = datetime.fromisoformat(value)


async def _wait_for_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Whether `event` was set within `timeout_s`.

    `asyncio.timeout`, not `asyncio.wait_for`: on Python 3.11, a `wait_for` that times out just as its task
    is cancelled from outside can swallow that cancellation. A caller's `wait_for(writer.flush(), 0.5)`
    then never returned, since flush() went on waiting (a test hung for 600 s).
    """
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


def _decrement(counter: Counter[str], key: str) -> None:
    count = counter.get(key, 0)
    if count > 1:
        counter[key] = count - 1
    elif count:
        del counter[key]


class EventWriter:
    """Queue → batched idempotent inserts → (on failure) spool on disk → replay. See the module doc."""

    def __init__(
        self,
        db: Database,
        spool_dir: Path,
        *,
        batch_size: int = 500,
        flush_interval_s: float = 0.05,
        max_retries: int = 3,
        backoff_s: float = 0.2,
        replay_interval_s: float = 2.0,
        max_queue: int = 100_000,
        write_timeout_s: float = 10.0,
    ) -> None:
        self.db = db  # may be swapped at runtime; each write uses the current one
        self.spool_dir = Path(spool_dir)
        self.batch_size = max(1, int(batch_size))
        self.flush_interval_s = flush_interval_s
        self.max_retries = max(0, int(max_retries))
        self.backoff_s = backoff_s
        self.replay_interval_s = replay_interval_s
        self.max_queue = max_queue
        # A write that hangs (a database that black-holes packets) counts as failed after this long:
        # the batch is spooled and the thread left to finish on its own (a late commit is harmless,
        # the replay skips rows already there).
        self.write_timeout_s = write_timeout_s

        # Counters (for /metrics). Every submitted row ends up counted once in written, spooled or
        # (rarely) rejected; replayed counts rows that reached the database from spool files.
        self.written = 0
        self.spooled = 0
        self.replayed = 0
        self.rejected = 0
        self.sanitized = 0  # rows that held values the database cannot store (store.sanitize), fixed on submit

        self._queue: deque[Entry] = deque()
        self._inflight = 0
        self._seq = 0  # last sequence number handed out
        self._done_seq = 0  # every queued row up to here is written, spooled or set aside
        self._urgent_seq = 0  # a flush() waits for rows up to here: don't linger for a fuller batch
        self._pending: Counter[str] = Counter()
        # Of those, rows spooled here: another writer sharing the directory may replay them and book
        # them there, so they are released here once the spool is seen empty (`_forget_replayed_elsewhere`).
        self._spooled: Counter[str] = Counter()
        self._db_down = False
        self._spool_failing = False  # the last append failed: the database is then the only way out
        self._stopping = False

        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._drain_lock = asyncio.Lock()
        self._flush_task: asyncio.Task | None = None
        self._replay_task: asyncio.Task | None = None

        self._spool = Spool(self.spool_dir)
        # Appends run on a thread of their own, not asyncio's default pool: database calls that hang
        # (a timed-out write is left running, a replay insert, a route's lookup) can hold every thread
        # there, and an append queued behind them would keep flush() and stop() from returning.
        self._spool_thread: ThreadPoolExecutor | None = None

    # --- public API ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the flush task and the replay loop (which first replays spool files already on disk)."""
        if self._running():
            return
        self._stopping = False
        self._stop_event.clear()
        self._flush_task = asyncio.create_task(self._flush_loop(), name="event-writer-flush")
        self._replay_task = asyncio.create_task(self._replay_loop(), name="event-writer-replay")

    async def stop(self) -> None:
        """Drain the queue; whatever cannot be written is spooled. Safe without start() and with the DB down."""
        self._stopping = True
        self._stop_event.set()
        self._wakeup.set()
        flush_task, replay_task = self._flush_task, self._replay_task
        if flush_task is not None:
            await asyncio.gather(flush_task, return_exceptions=True)
        if replay_task is not None:
            # A replay stops between chunks; one stuck in a hung database call is abandoned (its
            # file stays claimed by a dead process once this one exits, and is taken over then).
            done, _ = await asyncio.wait({replay_task}, timeout=self.write_timeout_s)
            if not done:
                replay_task.cancel()
                await asyncio.gather(replay_task, return_exceptions=True)
        self._flush_task = self._replay_task = None
        if self._queue:  # never started, or the flush task died
            await self._drain_inline()
        self._close_spool_thread()

    def submit(self, table: str, row: dict) -> None:
        """Queue one row (every column, incl. "id" and "ts"). Non-blocking; call from the event loop thread."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; expected one of {sorted(TABLES)}")
        if not isinstance(row, dict) or not row.get("id"):
            raise ValueError("row must be a dict with an 'id'")
        unknown = row.keys() - COLUMNS[table]
        if unknown:
            raise ValueError(f"unknown columns for {table}: {sorted(unknown)}")
        clean, changed = storable(table, row)
        if changed:
            self.sanitized += 1
            log.warning("%s row %s: %s made storable (store.sanitize)", table, clean["id"], ", ".join(changed))
        entry = Entry(table, dict(clean))
        entry.row["id"] = str(entry.row["id"])
        self._pending[entry.row["id"]] += 1
        if self.queue_depth >= self.max_queue:
            try:
                self._spool.append([entry])
            except OSError:
                log.exception("queue full and the spool is not writable; keeping the row in memory")
            else:
                self.spooled += 1
                self._spooled[entry.row["id"]] += 1
                return
        self._seq += 1
        entry.seq = self._seq
        self._queue.append(entry)
        self._wakeup.set()

    async def flush(self) -> None:
        """Return once every row submitted before the call is written or spooled."""
        target = self._seq
        while self._done_seq < target:
            if not self._running():
                await self._drain_inline()
                return
            self._urgent_seq = max(self._urgent_seq, target)
            self._wakeup.set()
            await _wait_for_event(self._progress, 0.5)

    def is_pending(self, row_id: str) -> bool:
        """Submitted but not yet known to be in the database (queued, in flight or spooled)."""
        return self._pending.get(row_id, 0) > 0

    @property
    def queue_depth(self) -> int:
        return len(self._queue) + self._inflight

    @property
    def spool_bytes(self) -> int:
        return self._spool.size_bytes

    # --- the flush path --------------------------------------------------------------------------

    def _running(self) -> bool:
        return self._flush_task is not None and not self._flush_task.done()

    async def _flush_loop(self) -> None:
        while True:
            try:
                if not self._queue:
                    if self._stopping:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._linger()
                batch = self._take_batch()
                leftover = await self._process_or_keep(batch)
                if leftover and not self._stopping:
                    self._finish(batch, leftover, requeue=True)
                    await asyncio.sleep(max(self.backoff_s, 0.05))
                else:
                    self._finish(batch, leftover, requeue=False)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the writer
                log.exception("event writer flush loop error")
                await asyncio.sleep(0.1)

    async def _linger(self) -> None:
        """Wait up to flush_interval_s for a fuller batch, unless stopping or a flush() is waiting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.flush_interval_s
        while (
            len(self._queue) < self.batch_size
            and not self._stopping
            and not (self._queue and self._urgent_seq >= self._queue[0].seq)
        ):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            if not await _wait_for_event(self._wakeup, remaining):
                return

    def _take_batch(self) -> list[Entry]:
        count = min(self.batch_size, len(self._queue))
        return [self._queue.popleft() for _ in range(count)]

    async def _drain_inline(self) -> None:
        """Write (or spool) the queue from the caller's task: used when no flush task is running."""
        async with self._drain_lock:
            while self._queue:
                batch = self._take_batch()
                leftover = await self._process_or_keep(batch)
                self._finish(batch, leftover, requeue=bool(leftover) and not self._stopping)
                if leftover and not self._stopping:
                    return

    def _finish(self, batch: list[Entry], leftover: list[Entry], *, requeue: bool) -> None:
        """Book a processed batch; `leftover` could be neither written nor spooled."""
        if leftover and requeue:
            self._queue.extendleft(reversed(leftover))
            done = min(entry.seq for entry in leftover) - 1
        else:
            if leftover:  # stopping, the database and the spool both failing: the last resort is the log
                for entry in leftover:
                    log.critical("UNWRITTEN %s", encode_entry(entry).rstrip())
                self._release(leftover)
            done = max(entry.seq for entry in batch)
        self._done_seq = max(self._done_seq, done)
        self._progress.set()
        self._progress = asyncio.Event()

    async def _process_or_keep(self, batch: list[Entry]) -> list[Entry]:
        """`_process`, where a bug (outages are handled inside) costs a retry of the batch, not its rows."""
        try:
            return await self._process(batch)
        except Exception:
            log.exception("event writer could not process a batch of %d rows; keeping them", len(batch))
            return batch

    async def _process(self, batch: list[Entry]) -> list[Entry]:
        """Write a batch, else spool it. Returns the rows that could be neither (the spool failed)."""
        self._inflight += len(batch)
        try:
            pending = batch
            refused: list[Entry] = []
            if not self._db_down or self._spool_failing:
                tries = 1 if self._stopping else 1 + self.max_retries
                for attempt in range(tries):
                    written, bad = [], []
                    try:
                        async with asyncio.timeout(self.write_timeout_s):  # not wait_for: see _wait_for_event
                            written, bad = await asyncio.to_thread(_write_entries, self.db, pending)
                        pending = []
                    except TimeoutError:
                        log.warning(
                            "event write timed out after %.1fs (attempt %d/%d, %d rows)",
                            self.write_timeout_s,
                            attempt + 1,
                            tries,
                            len(pending),
                        )
                    except _WriteFailed as exc:
                        written, bad, pending = exc.written, exc.bad, exc.remaining
                        log.warning(
                            "event write failed (attempt %d/%d, %d rows): %s", attempt + 1, tries, len(pending), exc
                        )
                    except Exception:
                        log.exception("event write failed unexpectedly (attempt %d/%d)", attempt + 1, tries)
                    self.written += len(written)
                    self._release(written)
                    refused.extend(bad)
                    if not pending:
                        break
                    if attempt + 1 < tries:
                        await asyncio.sleep(self.backoff_s * 2**attempt)
                if pending:
                    log.error("database unavailable; spooling events until a replay succeeds")
                    self._db_down = True
            to_spool = [Entry(e.table, e.row, e.attempts + 1, e.seq) for e in refused] + pending
            to_spool.sort(key=lambda e: _TABLE_ORDER[e.table])  # events before their feedback on replay
            if not to_spool:
                return []
            try:
                await self._append_to_spool(to_spool)
            except Exception:
                log.exception("could not spool %d rows", len(to_spool))
                self._spool_failing = True
                return refused + pending
            self._spool_failing = False
            self.spooled += len(to_spool)
            self._spooled.update(entry.row["id"] for entry in to_spool)
            return []
        finally:
            self._inflight -= len(batch)

    async def _append_to_spool(self, entries: list[Entry]) -> None:
        if self._spool_thread is None:  # made on first use: also after a stop(), for a late drain
            self._spool_thread = ThreadPoolExecutor(1, thread_name_prefix="event-writer-spool")
        await asyncio.get_running_loop().run_in_executor(self._spool_thread, self._spool.append, entries)

    def _close_spool_thread(self) -> None:
        # Nothing is left for it: the flush task and the drain have returned.
        if self._spool_thread is not None:
            self._spool_thread.shutdown(wait=False)
            self._spool_thread = None

    def _release(self, entries: list[Entry]) -> None:
        self._release_ids(entry.row["id"] for entry in entries)

    def _release_ids(self, ids) -> None:
        for row_id in ids:
            _decrement(self._pending, row_id)
            _decrement(self._spooled, row_id)

    # --- the replay path -------------------------------------------------------------------------

    async def _replay_loop(self) -> None:
        while not self._stopping:
            try:
                await self._replay_round()
            except Exception:
                log.exception("spool replay error")
            await _wait_for_event(self._stop_event, self.replay_interval_s)

    async def _replay_round(self) -> None:
        files = await asyncio.to_thread(self._spool.claimable)
        if not files:
            await self._forget_replayed_elsewhere()
        elif not await self._replay_files(files):
            return
        # Also after files replayed: one holding only rows kept for columns the database lacks writes nothing,
        # and may stay for a day (KEEP_FOR_NEWER_COLUMNS_S); the writer must not spool everything meanwhile.
        if self._db_down and await asyncio.to_thread(self.db.ping):
            log.info("database reachable again")
            self._db_down = False

    async def _replay_files(self, files: list[Path]) -> bool:
        """Replay `files` in order; False when one could not be (the database or the disk failing) or stopping."""
        for path in files:
            if self._stopping:
                return False
            claimed = self._spool.claim(path)
            if claimed is None:  # another replayer took it
                continue
            try:
                outcome = await asyncio.to_thread(self._replay_claimed, self.db, claimed)
                if not outcome.ok:
                    return False
                # Book the rows before the file goes: whoever sees the spool empty sees them done.
                self.replayed += outcome.replayed
                self.rejected += len(outcome.rejected_ids)
                self._release_ids(outcome.replayed_ids)
                self._release_ids(outcome.rejected_ids)
                try:
                    self._spool.remove(claimed)
                except OSError:
                    log.exception("could not remove the replayed spool file %s", claimed)
            finally:
                self._spool.release(claimed)
            if outcome.replayed and self._db_down:
                log.info("spool replay succeeded; writing to the database again")
                self._db_down = False
        return True

    async def _forget_replayed_elsewhere(self) -> None:
        """Release the rows spooled here once no spool file or claim is left: another writer sharing the
        directory replayed them (or set them aside) and booked them there. Without this they stayed
        pending for ever (`is_pending` true, the counter growing)."""
        if not self._spooled:
            return
        spooled = list(self._spooled.elements())  # appended (fsynced) before the look below
        try:
            empty = await asyncio.to_thread(self._spool.is_empty)
        except OSError:  # cannot tell: keep them pending
            return
        if empty:
            self._release_ids(spooled)

    def _awaiting_their_event(self, db: Database, refused: list[Entry]) -> list[Entry]:
        """Of the rows about to be set aside, the feedback refused for want of an event still on its way.

        On its way: in a spool file (this writer's or another's, being replayed or not: feedback answered
        201 here may wait on an event another worker is replaying), or in the database by now. Such a
        refusal is not held against the row; once its event is nowhere (set aside itself, or never
        there) it is set aside at its next refusal. No other bound is needed: an event leaves the spool
        once replayed or set aside. Looked for only at the last attempt, the spool is read at most once
        per replayed file. Blocking.
        """
        orphans = [entry for entry in refused if entry.missing_event and isinstance(entry.row.get("event_id"), str)]
        if not orphans:
            return []
        event_ids = {entry.row["event_id"] for entry in orphans}
        # The spool first: a replay inserts an event before it removes its file, so an event moving
        # from one to the other is seen in one or the other.
        coming = self._spool.holding("search_events", event_ids)
        coming |= _stored_events(db, event_ids - coming)
        return [entry for entry in orphans if entry.row["event_id"] in coming]

    def _replay_claimed(self, db: Database, claimed: Path) -> _ReplayOutcome:
        """Insert a claimed file's rows in order, in chunks; the caller removes the file on success.

        Blocking: runs in a worker thread. On failure the claim is given back.
        """
        outcome = _ReplayOutcome()
        retry: list[Entry] = []
        refused: list[Entry] = []
        unreadable: list[bytes] = []
        # The database's columns are looked up once per file, not per chunk: a backlog is not a round trip a
        # chunk. A migration meanwhile is seen by the next replay of the rows kept.
        widened: _Widened = {}
        waiting: list[Entry] = []  # kept for columns the database lacks
        overdue: list[Entry] = []  # ... for too long: set aside

        def insert(chunk: list[Entry]) -> None:
            # One transaction for the chunk, newer rows included: events go in before their feedback.
            writable, kept = _split_newer(db, chunk, widened)
            still, late = _past_keeping(kept, _now())
            waiting.extend(still)  # not a refusal: no attempt counted
            overdue.extend(late)
            written, bad = _write_entries(db, writable, widened)
            outcome.replayed += len(written)
            outcome.replayed_ids.extend(entry.row["id"] for entry in written)
            for entry in bad:
                entry.attempts += 1
                (refused if entry.attempts >= MAX_ROW_ATTEMPTS else retry).append(entry)

        try:
            with open(claimed, "rb") as handle:
                # Wait out an append that began before the claim; later appends see the rename.
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                chunk: list[Entry] = []
                for line in handle:
                    if not line.strip():
                        continue
                    try:
                        chunk.append(decode_entry(line))
                    except (ValueError, TypeError, AttributeError):
                        unreadable.append(line)
                        continue
                    if len(chunk) >= self.batch_size:
                        if self._stopping:  # shutting down: leave the rest to the next replay
                            raise InterruptedError("writer stopping")
                        insert(chunk)
                        chunk = []
                        self._spool.heartbeat(claimed)
                if chunk:
                    insert(chunk)
            for entry in self._awaiting_their_event(db, refused):
                entry.attempts -= 1  # this refusal is not held against it
                refused.remove(entry)
                retry.append(entry)
            retry.extend(waiting)
            refused.extend(overdue)
            if retry:
                self._spool.append(retry)
            if refused or unreadable:
                self._spool.set_aside(refused, unreadable)
                log.error(
                    "set aside %d refused spool rows in %s", len(refused) + len(unreadable), self._spool.rejected_path
                )
            _log_kept(waiting, overdue)
        except Exception as exc:
            # Database down (or the disk failing): give the file back whole; its rows that did get
            # in are skipped next time by ON CONFLICT DO NOTHING.
            log.warning("replay of %s failed, will retry: %s", claimed.name, exc)
            try:
                self._spool.unclaim(claimed)
            except OSError:
                log.exception("could not give back the claim on %s", claimed)
            return _ReplayOutcome(ok=False)
        outcome.ok = True
        outcome.rejected_ids = [entry.row["id"] for entry in refused]
        if outcome.replayed or refused or unreadable:
            log.info("replayed %d spooled rows from %s", outcome.replayed, claimed.name)
        return outcome
