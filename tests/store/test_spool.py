"""Spool files on their own (store/spool.py): which claims are stale, giving a claim back on a filesystem
without hard links, rotation, file modes and what is set aside for an operator."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

import pytest

from store import spool as spool_module
from store.spool import CLAIM_MARK, REJECTED_DIR, SPOOL_SUFFIX, Entry, Spool
from tests.store.conftest import dead_pid, event_row, feedback_row


def _claim_file(directory: Path, host: str, pid: int | str, stem: str = "h-1-x") -> Path:
    path = directory / f"{stem}{CLAIM_MARK}{host}-{pid}"
    path.write_text("{}\n")
    return path


def test_a_dead_claim_of_a_host_with_dashes_in_its_name_is_taken_over(tmp_path: Path) -> None:
    spool = Spool(tmp_path, host="web-1.prod-eu")
    dead = _claim_file(tmp_path, "web-1.prod-eu", dead_pid(), stem="a")
    live = _claim_file(tmp_path, "web-1.prod-eu", os.getppid(), stem="b")
    assert spool.claimable() == [dead] and live.exists()


@pytest.mark.parametrize(("pid", "stale"), [(0, True), ("x1", True), (1, False)])
def test_claims_naming_no_usable_process_are_stale_and_init_is_alive(tmp_path: Path, pid, stale: bool) -> None:
    path = _claim_file(tmp_path, "here", pid)
    assert Spool(tmp_path, host="here").claimable() == ([path] if stale else [])


def test_another_hosts_claim_is_taken_only_once_it_has_gone_quiet(tmp_path: Path, monkeypatch) -> None:
    path = _claim_file(tmp_path, "elsewhere", 12345)
    spool = Spool(tmp_path, host="here")
    assert spool.claimable() == []  # just written: its owner may be replaying it now
    monkeypatch.setattr(spool_module, "STALE_CLAIM_S", -1.0)
    assert spool.claimable() == [path]


def test_a_claim_this_process_holds_is_never_stale_for_its_other_writers(tmp_path: Path) -> None:
    first, second = Spool(tmp_path, host="here"), Spool(tmp_path, host="here")
    path = tmp_path / f"here-1-x{SPOOL_SUFFIX}"
    path.write_text("{}\n")
    claimed = first.claim(path)
    try:
        assert claimed is not None and second.claimable() == [] and first.claimable() == []
    finally:
        first.release(claimed)
    assert second.claimable() == [claimed]  # released without being removed: an earlier "us" left it


@pytest.mark.parametrize("taken", [False, True])
def test_giving_a_claim_back_without_hard_links(tmp_path: Path, monkeypatch, taken: bool) -> None:
    spool = Spool(tmp_path, host="here")
    path = tmp_path / f"here-1-x{SPOOL_SUFFIX}"
    path.write_text("old\n")
    claimed = spool.claim(path)
    if taken:
        path.write_text("new\n")

    def no_links(_source, _target):
        raise PermissionError("hard links are not supported here")

    monkeypatch.setattr(os, "link", no_links)
    spool.unclaim(claimed)
    spool.release(claimed)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert not claimed.exists()
    if taken:  # neither file replaces the other
        assert len(files) == 2 and path.read_text() == "new\n"
        (other,) = (tmp_path / name for name in files if name != path.name)
        assert other.name.startswith("here-1-x~") and other.name.endswith(SPOOL_SUFFIX)
        assert other.read_text() == "old\n"
    else:
        assert files == [path.name] and path.read_text() == "old\n"


def test_appends_create_the_directory_and_rotate_past_the_size_limit(tmp_path: Path, monkeypatch) -> None:
    directory = tmp_path / "var" / "spool"  # not there yet, nor its parent
    spool = Spool(directory, host="here")
    monkeypatch.setattr(spool_module, "SPOOL_ROTATE_BYTES", 2000)
    rows = [event_row() for _ in range(6)]
    for row in rows:
        spool.append([Entry("search_events", row)])
    files = sorted(directory.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    lines = [json.loads(line)["row"]["id"] for path in files for line in path.read_text().splitlines()]
    assert lines == [row["id"] for row in rows] and len(files) > 1  # every row once, in order, over files
    assert all(path.stat().st_size < 2000 + 2 * len(path.read_text().splitlines()[0]) for path in files)
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(path.stat().st_mode) for path in files} == {0o644 & ~umask}


@pytest.mark.parametrize("moves", [("claim",), ("give back",), ("claim", "give back")])
def test_the_size_counts_a_file_that_moves_while_it_is_counted(tmp_path: Path, monkeypatch, moves) -> None:
    """A claim renames the file, giving it back links then unlinks it: a listing taken just before names a
    file that is gone when it is looked at. The spool is still as full (a CI run once read it empty during
    a give-back, and a replay test went on to count rows that were still spooled)."""
    spool = Spool(tmp_path, host="here")
    spool.append([Entry("search_events", event_row())])
    (path,) = tmp_path.iterdir()
    size = path.stat().st_size
    held: list[Path] = [spool.claim(path) if moves[0] == "give back" else path]

    def move(kind: str) -> None:
        if kind == "claim":
            held[0] = spool.claim(held[0])
        else:
            Spool.unclaim(held[0])
            (held[0],) = tmp_path.iterdir()

    pending, real_scandir = list(moves), os.scandir

    def listing_then_a_move(directory):
        with real_scandir(directory) as entries:
            listed = list(entries)
        if pending:
            move(pending.pop(0))  # between the listing and the look at what it listed
        return contextlib.nullcontext(iter(listed))

    monkeypatch.setattr(spool_module.os, "scandir", listing_then_a_move)
    assert spool.size_bytes == size
    assert not pending


def test_a_file_listed_under_neither_name_while_it_moves_is_still_counted(tmp_path: Path, monkeypatch) -> None:
    """A rename while the directory is read may leave the file out of that listing under both names: a spool
    that looks empty is looked at again before the size or `is_empty` says so."""
    spool = Spool(tmp_path, host="here")
    spool.append([Entry("search_events", event_row())])
    (path,) = tmp_path.iterdir()
    torn, real_scandir = [True], os.scandir

    def a_torn_listing_first(directory):
        if torn and torn.pop():
            return contextlib.nullcontext(iter([]))
        return real_scandir(directory)

    monkeypatch.setattr(spool_module.os, "scandir", a_torn_listing_first)
    assert spool.size_bytes == path.stat().st_size
    torn.append(True)
    assert not spool.is_empty()


def test_each_set_aside_adds_whole_lines_to_one_file_for_an_operator(tmp_path: Path) -> None:
    spool = Spool(tmp_path, host="here")
    refused = [Entry("search_events", event_row(), attempts=5), Entry("feedback", {"id": "f-1"}, attempts=5)]
    spool.set_aside(refused, [b'{"table": "search_ev'])  # a torn line, kept as it was
    spool.set_aside([], [b"not json\n"])
    spool.set_aside([], [])
    (rejected,) = (tmp_path / REJECTED_DIR).iterdir()
    assert rejected == spool.rejected_path
    text = rejected.read_text()
    assert text.endswith("\n") and text.count("\n") == 4
    first, second, torn, raw = text.splitlines()
    assert json.loads(first)["row"]["id"] == refused[0].row["id"] and json.loads(first)["attempts"] == 5
    assert json.loads(second) == {"table": "feedback", "row": {"id": "f-1"}, "attempts": 5}
    assert (torn, raw) == ('{"table": "search_ev', "not json")


@pytest.mark.parametrize("attempts", [0, 1, 3])
def test_an_entry_comes_back_from_its_spool_line_as_it_went_in(attempts: int) -> None:
    """A row spooled during an outage (no refusals yet) must come back with none counted, or it would be set
    aside one replay early; datetimes come back as datetimes."""
    row = event_row()
    line = spool_module.encode_entry(Entry("search_events", dict(row), attempts))

    entry = spool_module.decode_entry(line.encode())

    assert (entry.table, entry.attempts) == ("search_events", attempts)
    assert entry.row["ts"] == row["ts"] and entry.row["id"] == row["id"]
    assert ("attempts" in json.loads(line)) is bool(attempts)


@pytest.mark.parametrize(
    "record",
    [
        {"table": "nope", "row": {"id": "x"}},
        {"table": "search_events", "row": ["x"]},
        {"table": "search_events", "row": {"query": "no id"}},
    ],
)
def test_lines_that_are_not_spool_records_are_refused(record: dict) -> None:
    with pytest.raises(ValueError):
        spool_module.decode_entry(json.dumps(record).encode())


def test_a_column_of_a_newer_release_is_kept_not_refused() -> None:
    row = event_row(added_by_a_newer_release=1)
    entry = spool_module.decode_entry(spool_module.encode_entry(Entry("search_events", row)).encode())
    assert entry.row["added_by_a_newer_release"] == 1 and entry.row["ts"] == row["ts"]
    assert spool_module.newer_columns(entry) == {"added_by_a_newer_release"}


def test_when_a_row_was_first_kept_for_newer_columns_survives_the_spool() -> None:
    entry = Entry("search_events", event_row(added_by_a_newer_release=1), attempts=2, kept_since=1_700_000_000.5)
    back = spool_module.decode_entry(spool_module.encode_entry(entry).encode())
    assert (back.attempts, back.kept_since) == (2, 1_700_000_000.5)
    assert "kept_since" not in spool_module.encode_entry(Entry("search_events", event_row()))


def test_holding_finds_rows_in_any_spool_file_or_claim_and_only_as_the_table_named(tmp_path: Path) -> None:
    mine, claimed, named_only, rejected = (event_row() for _ in range(4))
    Spool(tmp_path).append([Entry("search_events", mine)])
    other = Spool(tmp_path, host="elsewhere")
    other.append([Entry("search_events", claimed), Entry("feedback", feedback_row(named_only["id"]))])
    other.claim(other._path)  # being replayed by another worker: still held
    other.set_aside([Entry("search_events", rejected)], [])  # set aside: no longer in the spool
    (tmp_path / "h-1-torn.jsonl").write_bytes(b'{"table":"search_events","row":{"id":"' + mine["id"].encode())
    ids = {row["id"] for row in (mine, claimed, named_only, rejected)}
    assert Spool(tmp_path).holding("search_events", ids) == {mine["id"], claimed["id"]}
    assert Spool(tmp_path / "none-yet").holding("search_events", ids) == set()
