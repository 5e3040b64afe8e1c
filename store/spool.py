"""Spool files: where the event writer keeps rows the database would not take, until a replay.

A spool file is JSON lines, one `{"table", "row"[, "attempts"][, "kept_since"]}` record a line (datetimes as ISO
strings), appended and fsynced. Rows the database keeps refusing are set aside under
`<spool_dir>/rejected/` for an operator.

Spool file names: `<hostname>-<pid>-<uuid>.jsonl` (one writer's own file; replicas never share
one). A claimed file is `<stem>.replaying-<hostname>-<pid>`; a claim whose process is gone (same
host: the pid is dead, or is ours but no live claim of this process; another host: untouched for
STALE_CLAIM_S) is claimed again. Appends take an exclusive `flock` and check that the path still
names the file they opened, so a row is never appended to a file that has been claimed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Table

from store.models import Feedback, SearchEvent
from store.sanitize import storable
from store.types import UTCDateTime

# The tables a spool record may name (and so the writer may write); their columns are what a
# record is checked against when it is read back.
TABLES: dict[str, Table] = {"search_events": SearchEvent.__table__, "feedback": Feedback.__table__}
COLUMNS = {name: frozenset(table.c.keys()) for name, table in TABLES.items()}
_DATETIME_COLUMNS = {
    name: tuple(column.name for column in table.c if isinstance(column.type, UTCDateTime))
    for name, table in TABLES.items()
}

SPOOL_SUFFIX = ".jsonl"
CLAIM_MARK = ".replaying-"
# Looks at the directory before a reading settles for what it saw while files kept moving (`Spool._settled`).
_LOOKS = 5
REJECTED_DIR = "rejected"
SPOOL_ROTATE_BYTES = 64 * 1024 * 1024
STALE_CLAIM_S = 600.0  # a claim from another host untouched this long is taken over

HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"

# Claims held by this process (all writers in it), so a claim named with our own pid is only
# taken over when it belongs to an earlier process that had the same pid (containers reuse pids).
_ACTIVE_CLAIMS: set[str] = set()
_CLAIMS_LOCK = threading.Lock()


@dataclass(slots=True)
class Entry:
    table: str
    row: dict[str, Any]
    attempts: int = 0  # times the database refused this row on its own (not counting outages)
    seq: int = 0  # position in the queue; 0 for rows that never went through it
    missing_event: bool = False  # its last refusal was a foreign key: its event not in the database (not spooled)
    # When a replay first kept it for columns the database lacks (a newer release's; epoch seconds, 0: never).
    kept_since: float = 0.0


# --- spool encoding --------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def encode_entry(entry: Entry) -> str:
    record: dict[str, Any] = {"table": entry.table, "row": entry.row}
    if entry.attempts:
        record["attempts"] = entry.attempts
    if entry.kept_since:
        record["kept_since"] = entry.kept_since
    try:
        text = json.dumps(record, default=_json_default, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError):  # e.g. a circular structure: keep what can be kept
        record["row"] = {key: _json_default(value) for key, value in entry.row.items()}
        text = json.dumps(record, default=_json_default, ensure_ascii=False, separators=(",", ":"))
    return text + "\n"


def decode_entry(line: bytes) -> Entry:
    """One spool line back to an entry; datetimes (ISO strings) back to datetimes. ValueError if unusable.

    Columns this release does not know (`newer_columns`) are kept: a newer release sharing the spool wrote
    them (a rolling deploy), and the writer inserts them where the database has them.
    """
    record = json.loads(line)
    table, row = record.get("table"), record.get("row")
    if table not in TABLES or not isinstance(row, dict) or not row.get("id"):
        raise ValueError("not a spool record")
    for name in _DATETIME_COLUMNS[table]:
        if isinstance(row.get(name), str):
            row[name] = datetime.fromisoformat(row[name])
    # Rows spooled before the writer made them storable (store.sanitize) would be refused for ever.
    row, _changed = storable(table, row)
    return Entry(table, row, int(record.get("attempts") or 0), kept_since=float(record.get("kept_since") or 0))


def _rows_in(path: Path, table: str, ids: set[str]) -> set[str]:
    """Which of `ids` the spool file at `path` holds as a `table` row."""
    # A row's id is written as json.dumps writes it; a line holding it may also be another row that
    # names it (feedback names its event), so a line that does is read to tell.
    needles = {row_id: json.dumps(row_id, ensure_ascii=False).encode() for row_id in ids}
    found: set[str] = set()
    with open(path, "rb") as handle:
        for line in handle:
            for row_id, needle in needles.items():
                if needle in line and row_id not in found and _is_row(line, table, row_id):
                    found.add(row_id)
            if len(found) == len(needles):
                break
    return found


def _is_row(line: bytes, table: str, row_id: str) -> bool:
    try:
        record = json.loads(line)
    except ValueError:  # a torn last line, being appended
        return False
    if not isinstance(record, dict) or record.get("table") != table:
        return False
    row = record.get("row")
    return isinstance(row, dict) and row.get("id") == row_id


def newer_columns(entry: Entry) -> frozenset[str]:
    """The columns of a spooled row that this release does not know (written by a newer one)."""
    return frozenset(entry.row.keys() - COLUMNS[entry.table])


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


class Spool:
    """One writer's view of a spool directory: its own file to append to, and the claims it replays.

    Names carry `host` and the current pid (read at each use, not fixed here, so they stay right
    in a forked child). Methods block on the disk: call them from a worker thread.
    """

    def __init__(self, directory: Path, *, host: str = HOST) -> None:
        self.directory = Path(directory)
        self.host = host
        self._lock = threading.Lock()  # one append (or set-aside) at a time from this writer
        self._path = self._new_path()
        self.rejected_path = self.directory / REJECTED_DIR / self._new_path().name

    def _new_path(self) -> Path:
        return self.directory / f"{self.host}-{os.getpid()}-{uuid.uuid4()}{SPOOL_SUFFIX}"

    @property
    def size_bytes(self) -> int:
        """Bytes in spool files and claims (not rejected/); 0 when the directory cannot be read."""
        try:
            return self._settled()[1]
        except OSError:
            return 0

    def is_empty(self) -> bool:
        """No spool file or claim is left. Raises OSError when the directory cannot be read."""
        return self._settled()[0] == 0

    def _settled(self) -> tuple[int, int]:
        """(files, bytes) in spool files and claims, from a look that no rename (a claim, a give-back) tore.

        A file renamed while the directory is read may be listed and gone by the time it is looked at, or
        listed under neither name: the directory is looked at again while a listed file moved, and once more
        when it looked empty, so that a spool whose only file is moving never reads as empty (the gauge an
        alert watches, the sign that a replay is done). Raises OSError when the directory cannot be read.
        """
        files = total = empty_looks = 0
        for _ in range(_LOOKS):
            files, total, moved = self._look()
            if moved:
                continue
            empty_looks += not files
            if files or empty_looks == 2:
                break
        return files, total

    def _look(self) -> tuple[int, int, bool]:
        """(files, bytes, whether a listed file was gone by the time it was looked at)."""
        files = total = 0
        moved = False
        for entry in self._entries():
            try:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
                    files += 1
            except FileNotFoundError:
                moved = True
            except OSError:
                continue
        return files, total, moved

    def _entries(self) -> list[os.DirEntry]:
        """The directory's spool files and claims (not rejected/), as listed; none before anything was spooled.
        Raises OSError when the directory cannot be read."""
        try:
            with os.scandir(self.directory) as entries:
                return [entry for entry in entries if _is_spool_name(entry.name)]
        except FileNotFoundError:
            return []

    def holding(self, table: str, ids: Iterable[str]) -> set[str]:
        """Which of `ids` a spool file or claim holds as a `table` row: anyone's, being replayed or not.

        A file that moves while it is read (claimed, given back, or replayed and removed, its refused rows
        appended to the replayer's own file first) is looked for again under the names then listed, so a
        row moving from one file to another is not missed. Raises OSError when the directory cannot be
        read: then nobody can say.
        """
        wanted, found = set(ids), set()
        for _ in range(_LOOKS):
            moved = False
            for path in (Path(entry.path) for entry in self._entries()):
                try:
                    found |= _rows_in(path, table, wanted - found)
                except FileNotFoundError:
                    moved = True
            if not moved or found == wanted:
                break
        return found

    def append(self, entries: list[Entry]) -> None:
        """Append entries to this writer's spool file and fsync. Thread-safe."""
        data = "".join(encode_entry(entry) for entry in entries).encode()
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            while True:
                path = self._path
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
                    _fsync_dir(self.directory)
                if size >= SPOOL_ROTATE_BYTES:
                    self._path = self._new_path()
                return

    def set_aside(self, entries: list[Entry], raw_lines: list[bytes]) -> None:
        """Append refused rows (and unreadable lines, as they were) to rejected/, for an operator."""
        if not entries and not raw_lines:
            return
        data = "".join(encode_entry(entry) for entry in entries).encode()
        data += b"".join(line if line.endswith(b"\n") else line + b"\n" for line in raw_lines)
        self.rejected_path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.rejected_path, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    def claimable(self) -> list[Path]:
        """Spool files to replay, oldest first: `*.jsonl` and stale claims; none when the directory cannot be read
        (the replay loop then still sees whether the database is back)."""
        found: list[tuple[float, str, Path]] = []
        try:
            listed = self._entries()
        except OSError:
            return []
        for entry in listed:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            path = Path(entry.path)
            if entry.name.endswith(SPOOL_SUFFIX) or self._stale_claim(path, st):
                found.append((st.st_mtime, entry.name, path))
        return [path for _mtime, _name, path in sorted(found)]

    def _stale_claim(self, path: Path, st: os.stat_result) -> bool:
        with _CLAIMS_LOCK:
            if str(path) in _ACTIVE_CLAIMS:
                return False
        owner = path.name.rpartition(CLAIM_MARK)[2]
        host, _, pid_text = owner.rpartition("-")
        if host != self.host:
            return time.time() - st.st_ctime > STALE_CLAIM_S
        try:
            pid = int(pid_text)
        except ValueError:
            return True
        # Our own pid but not an active claim of ours: an earlier process that had the same pid.
        return pid == os.getpid() or not _pid_alive(pid)

    def claim(self, path: Path) -> Path | None:
        """Claim a spool file by atomic rename; None when another replayer got it first.

        The claim stays registered as this process's until `release()`, also after `unclaim()`.
        """
        name = path.name
        stem = name[: -len(SPOOL_SUFFIX)] if name.endswith(SPOOL_SUFFIX) else name.rpartition(CLAIM_MARK)[0]
        owner = f"{self.host}-{os.getpid()}"
        with _CLAIMS_LOCK:
            target = path.with_name(f"{stem}{CLAIM_MARK}{owner}")
            if target.exists() or str(target) in _ACTIVE_CLAIMS:
                target = path.with_name(f"{stem}~{uuid.uuid4().hex[:8]}{CLAIM_MARK}{owner}")
            _ACTIVE_CLAIMS.add(str(target))
        try:
            os.rename(path, target)
        except FileNotFoundError:
            self.release(target)
            return None
        return target

    @staticmethod
    def release(claimed: Path) -> None:
        """Forget a claim of this process (its file replayed and removed, or given back)."""
        with _CLAIMS_LOCK:
            _ACTIVE_CLAIMS.discard(str(claimed))

    @staticmethod
    def heartbeat(claimed: Path) -> None:
        """Show other hosts that a long replay of `claimed` is still alive."""
        _heartbeat(claimed)

    @staticmethod
    def remove(claimed: Path) -> None:
        """Delete a replayed file; one already gone is fine. Raises OSError otherwise."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(claimed)

    @staticmethod
    def unclaim(claimed: Path) -> None:
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
