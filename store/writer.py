"""The batching event writer: writes from the request path go through it, off the hot path, never lost.

`submit()` only appends to an in-memory queue. A background task takes batches off the queue and
writes each in one transaction in a worker thread, with `INSERT .. ON CONFLICT (id) DO NOTHING`, so
a retry or a replay is idempotent. A batch the database will not take (after retries with
exponential backoff) is appended to a spool file (JSON lines, fsynced); a replay loop claims spool
files by atomic rename and inserts their rows once the database is back. A row the database
rejects on its own (a constraint, a bad value) is isolated from its batch, retried through the
spool a few times (feedback may arrive before its event is replayed) and then set aside under
`<spool_dir>/rejected/` for an operator: kept, never blocking the other rows.

Spool file names: `<hostname>-<pid>-<uuid>.jsonl` (one writer's own file; replicas never share
one). A claimed file is `<stem>.replaying-<hostname>-<pid>`; a claim whose process is gone (same
host: the pid is dead, or is ours but no live claim of this process; another host: untouched for
STALE_CLAIM_S) is claimed again. Appends take an exclusive `flock` and check that the path still
names the file they opened, so a row is never appended to a file that has been claimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Table
from sqlalchemy import exc as sa_exc
from sqlalchemy import insert as generic_insert
from sqlalchemy.dialects import postgresql, sqlite

from store.db import Database
from store.models import Feedback, SearchEvent

log = logging.getLogger(__name__)

TABLES: dict[str, Table] = {"search_events": SearchEvent.__table__, "feedback": Feedback.__table__}
# Insert order inside a transaction: feedback has a foreign key to search_events.
_TABLE_ORDER = {name: position for position, name in enumerate(TABLES)}
_COLUMNS = {name: frozenset(table.c.keys()) for name, table in TABLES.items()}
_DATETIME_COLUMNS = {
    name: tuple(column.name for column in table.c if isinstance(column.type, DateTime))
    for name, table in TABLES.items()
}

SPOOL_SUFFIX = ".jsonl"
CLAIM_MARK = ".replaying-"
REJECTED_DIR = "rejected"
MAX_ROW_ATTEMPTS = 5  # a row the database refuses this many times is set aside, not retried forever
SPOOL_ROTATE_BYTES = 64 * 1024 * 1024
STALE_CLAIM_S = 600.0  # a claim from another host untouched this long is taken over

_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"

# Claims held by this process (all writers in it), so a claim named with our own pid is only
# taken over when it belongs to an earlier process that had the same pid (containers reuse pids).
_ACTIVE_CLAIMS: set[str] = set()
_CLAIMS_LOCK = threading.Lock()


@dataclass(slots=True)
class _Entry:
    table: str
    row: dict[str, Any]
    attempts: int = 0  # times the database refused this row on its own (not counting outages)
    seq: int = 0  # position in the queue; 0 for rows that never went through it


class _WriteFailed(Exception):
    """The database (not a row) failed; `written` made it in before, `remaining` did not."""

    def __init__(self, written: list[_Entry], bad: list[_Entry], remaining: list[_Entry], cause: BaseException):
        super().__init__(str(cause))
        self.written, self.bad, self.remaining, self.cause = written, bad, remaining, cause


@dataclass
class _ReplayOutcome:
    ok: bool = False
    replayed: int = 0
    replayed_ids: list[str] = field(default_factory=list)
    rejected_ids: list[str] = field(default_factory=list)


# --- SQL -------------------------------------------------------------------------------------------


def _insert_statement(dialect: str, table: Table):
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=["id"])
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=["id"])
    return generic_insert(table)  # other dialects: no idempotent replay (only SQLite and PostgreSQL are supported)


def _insert(connection, entries: list[_Entry]) -> None:
    """Insert in one transaction: search_events first, rows with the same columns in one executemany."""
    groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for entry in sorted(entries, key=lambda e: _TABLE_ORDER[e.table]):
        groups.setdefault((entry.table, tuple(sorted(entry.row))), []).append(entry.row)
    dialect = connection.dialect.name
    for (table, _columns), rows in groups.items():
        connection.execute(_insert_statement(dialect, TABLES[table]), rows)


def _is_row_error(exc: BaseException) -> bool:
    """True when the rows are at fault (constraint, bad value), not the database being unavailable."""
    if isinstance(exc, sa_exc.IntegrityError | sa_exc.DataError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        return False  # OperationalError, ProgrammingError (schema missing), InterfaceError, ...
    return isinstance(exc, sa_exc.StatementError | sa_exc.CompileError | TypeError | ValueError)


def _write_entries(db: Database, entries: list[_Entry]) -> tuple[list[_Entry], list[_Entry]]:
    """Write entries; returns (written, refused rows). Raises _WriteFailed when the database fails.

    Blocking: runs in a worker thread. One transaction for the batch; if a row spoils it, each row
    is retried in its own transaction so the good ones get in and the bad ones are isolated.
    """
    try:
        with db.engine.begin() as connection:
            _insert(connection, entries)
        return entries, []
    except Exception as exc:
        if not _is_row_error(exc):
            raise _WriteFailed([], [], entries, exc) from exc
        log.warning("a batch of %d rows was refused (%s); writing them one by one", len(entries), exc)
    written: list[_Entry] = []
    bad: list[_Entry] = []
    ordered = sorted(entries, key=lambda e: _TABLE_ORDER[e.table])
    for position, entry in enumerate(ordered):
        try:
            with db.engine.begin() as connection:
                _insert(connection, [entry])
            written.append(entry)
        except Exception as exc:
            if not _is_row_error(exc):
                raise _WriteFailed(written, bad, ordered[position:], exc) from exc
            log.warning("%s row %s refused: %s", entry.table, entry.row.get("id"), exc)
            bad.append(entry)
    return written, bad


# --- spool encoding --------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _encode(entry: _Entry) -> str:
    record: dict[str, Any] = {"table": entry.table, "row": entry.row}
    if entry.attempts:
        record["attempts"] = entry.attempts
    try:
        text = json.dumps(record, default=_json_default, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError):  # e.g. a circular structure: keep what can be kept
        record["row"] = {key: _json_default(value) for key, value in entry.row.items()}
        text = json.dumps(record, default=_json_default, ensure_ascii=False, separators=(",", ":"))
    return text + "\n"


def _decode(line: bytes) -> _Entry:
    """One spool line back to an entry; datetimes (ISO strings) back to datetimes. ValueError if unusable."""
    record = json.loads(line)
    table, row = record.get("table"), record.get("row")
    if table not in TABLES or not isinstance(row, dict) or not row.get("id"):
        raise ValueError("not a spool record")
    if row.keys() - _COLUMNS[table]:
        raise ValueError(f"unknown columns for {table}: {sorted(row.keys() - _COLUMNS[table])}")
    for name in _DATETIME_COLUMNS[table]:
        if isinstance(row.get(name), str):
            row[name] = datetime.fromisoformat(row[name])
    return _Entry(table, row, int(record.get("attempts") or 0))


# --- spool files -----------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _heartbeat(path: Path) -> None:
    """Refresh a claim's ctime (what other hosts judge staleness by) without touching its mtime."""
    with contextlib.suppress(OSError):
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _is_spool_name(name: str) -> bool:
    return not name.startswith(".") and (name.endswith(SPOOL_SUFFIX) or CLAIM_MARK in name)


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

        self._queue: deque[_Entry] = deque()
        self._inflight = 0
        self._seq = 0  # last sequence number handed out
        self._done_seq = 0  # every queued row up to here is written, spooled or set aside
        self._urgent_seq = 0  # a flush() waits for rows up to here: don't linger for a fuller batch
        self._pending: Counter[str] = Counter()
        self._db_down = False
        self._stopping = False

        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._drain_lock = asyncio.Lock()
        self._flush_task: asyncio.Task | None = None
        self._replay_task: asyncio.Task | None = None

        self._spool_lock = threading.Lock()
        self._spool_path = self._new_spool_path()
        self._rejected_path = self.spool_dir / REJECTED_DIR / self._new_spool_path().name

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

    def submit(self, table: str, row: dict) -> None:
        """Queue one row (every column, incl. "id" and "ts"). Non-blocking; call from the event loop thread."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; expected one of {sorted(TABLES)}")
        if not isinstance(row, dict) or not row.get("id"):
            raise ValueError("row must be a dict with an 'id'")
        unknown = row.keys() - _COLUMNS[table]
        if unknown:
            raise ValueError(f"unknown columns for {table}: {sorted(unknown)}")
        entry = _Entry(table, dict(row))
        entry.row["id"] = str(entry.row["id"])
        self._pending[entry.row["id"]] += 1
        if self.queue_depth >= self.max_queue:
            try:
                self._append_spool([entry])
            except OSError:
                log.exception("queue full and the spool is not writable; keeping the row in memory")
            else:
                self.spooled += 1
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
            progress = self._progress
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.wait(), 0.5)

    def is_pending(self, row_id: str) -> bool:
        """Submitted but not yet known to be in the database (queued, in flight or spooled)."""
        return self._pending.get(row_id, 0) > 0

    @property
    def queue_depth(self) -> int:
        return len(self._queue) + self._inflight

    @property
    def spool_bytes(self) -> int:
        total = 0
        try:
            with os.scandir(self.spool_dir) as entries:
                for entry in entries:
                    if _is_spool_name(entry.name):
                        with contextlib.suppress(OSError):
                            if entry.is_file(follow_symlinks=False):
                                total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            return 0
        return total

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
                leftover = await self._process(batch)
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
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Entry]:
        count = min(self.batch_size, len(self._queue))
        return [self._queue.popleft() for _ in range(count)]

    async def _drain_inline(self) -> None:
        """Write (or spool) the queue from the caller's task: used when no flush task is running."""
        async with self._drain_lock:
            while self._queue:
                batch = self._take_batch()
                leftover = await self._process(batch)
                self._finish(batch, leftover, requeue=bool(leftover) and not self._stopping)
                if leftover and not self._stopping:
                    return

    def _finish(self, batch: list[_Entry], leftover: list[_Entry], *, requeue: bool) -> None:
        """Book a processed batch; `leftover` could be neither written nor spooled."""
        if leftover and requeue:
            self._queue.extendleft(reversed(leftover))
            done = min(entry.seq for entry in leftover) - 1
        else:
            if leftover:  # stopping, the database and the spool both failing: the last resort is the log
                for entry in leftover:
                    log.critical("UNWRITTEN %s", _encode(entry).rstrip())
                self._release(leftover)
            done = max(entry.seq for entry in batch)
        self._done_seq = max(self._done_seq, done)
        self._progress.set()
        self._progress = asyncio.Event()

    async def _process(self, batch: list[_Entry]) -> list[_Entry]:
        """Write a batch, else spool it. Returns the rows that could be neither (the spool failed)."""
        self._inflight += len(batch)
        try:
            pending = batch
            refused: list[_Entry] = []
            if not self._db_down:
                tries = 1 if self._stopping else 1 + self.max_retries
                for attempt in range(tries):
                    written, bad = [], []
                    try:
                        written, bad = await asyncio.wait_for(
                            asyncio.to_thread(_write_entries, self.db, pending), self.write_timeout_s
                        )
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
            to_spool = [_Entry(e.table, e.row, e.attempts + 1, e.seq) for e in refused] + pending
            to_spool.sort(key=lambda e: _TABLE_ORDER[e.table])  # events before their feedback on replay
            if not to_spool:
                return []
            try:
                await asyncio.to_thread(self._append_spool, to_spool)
            except Exception:
                log.exception("could not spool %d rows", len(to_spool))
                return refused + pending
            self.spooled += len(to_spool)
            return []
        finally:
            self._inflight -= len(batch)

    def _release(self, entries: list[_Entry]) -> None:
        self._release_ids(entry.row["id"] for entry in entries)

    def _release_ids(self, ids) -> None:
        pending = self._pending
        for row_id in ids:
            count = pending.get(row_id, 0)
            if count > 1:
                pending[row_id] = count - 1
            elif count:
                del pending[row_id]

    # --- spool files -----------------------------------------------------------------------------

    def _new_spool_path(self) -> Path:
        return self.spool_dir / f"{_HOST}-{os.getpid()}-{uuid.uuid4()}{SPOOL_SUFFIX}"

    def _append_spool(self, entries: list[_Entry]) -> None:
        """Append entries to this writer's spool file and fsync. Blocking; thread-safe."""
        data = "".join(_encode(entry) for entry in entries).encode()
        with self._spool_lock:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            while True:
                path = self._spool_path
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    try:
                        current = os.stat(path).st_ino == os.fstat(fd).st_ino
                    except FileNotFoundError:
                        current = False
                    if not current:  # claimed for replay since we opened it: open the path afresh
                        continue
                    start = os.fstat(fd).st_size
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view) :]
                        os.fsync(fd)
                    except OSError:
                        with contextlib.suppress(OSError):
                            os.ftruncate(fd, start)  # no torn line for the next append to run into
                        raise
                    size = start + len(data)
                finally:
                    os.close(fd)  # also releases the lock
                if start == 0:
                    _fsync_dir(self.spool_dir)
                if size >= SPOOL_ROTATE_BYTES:
                    self._spool_path = self._new_spool_path()
                return

    def _set_aside(self, entries: list[_Entry], raw_lines: list[bytes]) -> None:
        """Rows the database keeps refusing (and unreadable lines) go to rejected/ for an operator."""
        if not entries and not raw_lines:
            return
        data = "".join(_encode(entry) for entry in entries).encode()
        data += b"".join(line if line.endswith(b"\n") else line + b"\n" for line in raw_lines)
        self._rejected_path.parent.mkdir(parents=True, exist_ok=True)
        with self._spool_lock, open(self._rejected_path, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        log.error("set aside %d refused spool rows in %s", len(entries) + len(raw_lines), self._rejected_path)

    def _claimable(self) -> list[Path]:
        """Spool files to replay, oldest first: `*.jsonl` and stale claims."""
        found: list[tuple[float, str, Path]] = []
        try:
            with os.scandir(self.spool_dir) as entries:
                for entry in entries:
                    if not _is_spool_name(entry.name):
                        continue
                    try:
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    path = Path(entry.path)
                    if entry.name.endswith(SPOOL_SUFFIX) or self._stale_claim(path, st):
                        found.append((st.st_mtime, entry.name, path))
        except FileNotFoundError:
            return []
        return [path for _mtime, _name, path in sorted(found)]

    @staticmethod
    def _stale_claim(path: Path, st: os.stat_result) -> bool:
        with _CLAIMS_LOCK:
            if str(path) in _ACTIVE_CLAIMS:
                return False
        owner = path.name.rpartition(CLAIM_MARK)[2]
        host, _, pid_text = owner.rpartition("-")
        if host != _HOST:
            return time.time() - st.st_ctime > STALE_CLAIM_S
        try:
            pid = int(pid_text)
        except ValueError:
            return True
        # Our own pid but not an active claim of ours: an earlier process that had the same pid.
        return pid == os.getpid() or not _pid_alive(pid)

    @staticmethod
    def _claim(path: Path) -> Path | None:
        """Claim a spool file by atomic rename; None when another replayer got it first."""
        name = path.name
        stem = name[: -len(SPOOL_SUFFIX)] if name.endswith(SPOOL_SUFFIX) else name.rpartition(CLAIM_MARK)[0]
        with _CLAIMS_LOCK:
            target = path.with_name(f"{stem}{CLAIM_MARK}{_HOST}-{os.getpid()}")
            if target.exists() or str(target) in _ACTIVE_CLAIMS:
                target = path.with_name(f"{stem}~{uuid.uuid4().hex[:8]}{CLAIM_MARK}{_HOST}-{os.getpid()}")
            _ACTIVE_CLAIMS.add(str(target))
        try:
            os.rename(path, target)
        except FileNotFoundError:
            with _CLAIMS_LOCK:
                _ACTIVE_CLAIMS.discard(str(target))
            return None
        return target

    @staticmethod
    def _unclaim(claimed: Path) -> None:
        """Give a claimed file back as `<stem>.jsonl` (a fresh name if that exists again)."""
        stem = claimed.name.rpartition(CLAIM_MARK)[0]
        original = claimed.with_name(stem + SPOOL_SUFFIX)
        try:
            os.link(claimed, original)  # unlike rename, never replaces a file of the same name
            os.unlink(claimed)
        except FileExistsError:
            os.rename(claimed, claimed.with_name(f"{stem}~{uuid.uuid4().hex[:8]}{SPOOL_SUFFIX}"))
        except OSError:
            if not original.exists():
                os.rename(claimed, original)
            elif claimed.exists():
                os.rename(claimed, claimed.with_name(f"{stem}~{uuid.uuid4().hex[:8]}{SPOOL_SUFFIX}"))

    # --- the replay path -------------------------------------------------------------------------

    async def _replay_loop(self) -> None:
        while not self._stopping:
            try:
                await self._replay_round()
            except Exception:
                log.exception("spool replay error")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), self.replay_interval_s)

    async def _replay_round(self) -> None:
        files = await asyncio.to_thread(self._claimable)
        if not files:
            if self._db_down and await asyncio.to_thread(self.db.ping):
                log.info("database reachable again")
                self._db_down = False
            return
        for path in files:
            if self._stopping:
                return
            claimed = self._claim(path)
            if claimed is None:  # another replayer took it
                continue
            try:
                outcome = await asyncio.to_thread(self._replay_claimed, self.db, claimed)
                if not outcome.ok:
                    return
                # Book the rows before the file goes: whoever sees the spool empty sees them done.
                self.replayed += outcome.replayed
                self.rejected += len(outcome.rejected_ids)
                self._release_ids(outcome.replayed_ids)
                self._release_ids(outcome.rejected_ids)
                try:
                    os.unlink(claimed)
                except FileNotFoundError:
                    pass
                except OSError:
                    log.exception("could not remove the replayed spool file %s", claimed)
            finally:
                with _CLAIMS_LOCK:
                    _ACTIVE_CLAIMS.discard(str(claimed))
            if outcome.replayed and self._db_down:
                log.info("spool replay succeeded; writing to the database again")
                self._db_down = False

    def _replay_claimed(self, db: Database, claimed: Path) -> _ReplayOutcome:
        """Insert a claimed file's rows in order, in chunks; the caller removes the file on success.

        Blocking: runs in a worker thread. On failure the claim is given back.
        """
        outcome = _ReplayOutcome()
        retry: list[_Entry] = []
        refused: list[_Entry] = []
        unreadable: list[bytes] = []

        def insert(chunk: list[_Entry]) -> None:
            written, bad = _write_entries(db, chunk)
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
                chunk: list[_Entry] = []
                for line in handle:
                    if not line.strip():
                        continue
                    try:
                        chunk.append(_decode(line))
                    except (ValueError, TypeError, AttributeError):
                        unreadable.append(line)
                        continue
                    if len(chunk) >= self.batch_size:
                        if self._stopping:  # shutting down: leave the rest to the next replay
                            raise InterruptedError("writer stopping")
                        insert(chunk)
                        chunk = []
                        _heartbeat(claimed)
                if chunk:
                    insert(chunk)
            if retry:
                self._append_spool(retry)
            self._set_aside(refused, unreadable)
        except Exception as exc:
            # Database down (or the disk failing): give the file back whole; its rows that did get
            # in are skipped next time by ON CONFLICT DO NOTHING.
            log.warning("replay of %s failed, will retry: %s", claimed.name, exc)
            try:
                self._unclaim(claimed)
            except OSError:
                log.exception("could not give back the claim on %s", claimed)
            return _ReplayOutcome(ok=False)
        outcome.ok = True
        outcome.rejected_ids = [entry.row["id"] for entry in refused]
        if outcome.replayed or refused or unreadable:
            log.info("replayed %d spooled rows from %s", outcome.replayed, claimed.name)
        return outcome
