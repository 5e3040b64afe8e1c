"""store.cachedir.build_once: concurrent first starts build a cache directory once; a failed build leaves
nothing behind; a finished copy that appeared outside the lock wins the rename."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from store.cachedir import build_once

ROOT = Path(__file__).resolve().parents[2]


def _complete(path: Path) -> bool:
    return (path / "done").is_file()


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def test_processes_starting_together_build_once_and_all_use_it(tmp_path: Path) -> None:
    out, builds = tmp_path / "cache" / "model", tmp_path / "builds.log"
    script = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from store.cachedir import build_once\n"
        "out, builds = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "def build(tmp):\n"
        "    with open(builds, 'a') as log: log.write(f'{os.getpid()}\\n')\n"
        "    time.sleep(1.0)  # long enough for the others to arrive while it builds\n"
        "    (tmp / 'done').write_text('weights')\n"
        "    (tmp / 'done').chmod(0o600)  # as a writer of private files leaves it: the cache is shared\n"
        "print(build_once(out, lambda p: (p / 'done').is_file(), build))\n"
    )
    starts = [subprocess.Popen([sys.executable, "-c", script, str(out), str(builds)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True) for _ in range(3)]
    printed = [start.communicate(timeout=120)[0].strip() for start in starts]
    assert [start.returncode for start in starts] == [0, 0, 0]
    assert printed == [str(out)] * 3
    assert len(builds.read_text().splitlines()) == 1  # one built, two waited and used it
    assert (out / "done").read_text() == "weights" and _leftovers(out.parent) == []
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and stat.S_IMODE((out / "done").stat().st_mode) == 0o644


def test_a_failed_build_leaves_nothing_and_the_next_start_builds(tmp_path: Path) -> None:
    out = tmp_path / "model"

    def failing(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(out, _complete, failing)
    assert not out.exists() and _leftovers(tmp_path) == []
    assert build_once(out, _complete, lambda tmp: (tmp / "done").write_text("ok")) == out
    assert build_once(out, _complete, lambda tmp: pytest.fail("built again")) == out  # complete: used as is


def _raced_by(out: Path, their_file: str) -> Callable[[Path], None]:
    """A build during which a builder the lock cannot see puts a directory at `out` holding `their_file`."""

    def build(tmp: Path) -> None:
        (tmp / "done").write_text("ours")
        out.mkdir()
        (out / their_file).write_text("theirs")

    return build


def test_a_finished_copy_from_outside_the_lock_wins_the_rename(tmp_path: Path) -> None:
    """Another host on a shared cache (flock may not reach it) finishes first: its copy is used, ours dropped."""
    out = tmp_path / "model"
    assert build_once(out, _complete, _raced_by(out, "done")) == out
    assert (out / "done").read_text() == "theirs" and _leftovers(tmp_path) == []


def test_an_unfinished_directory_in_the_way_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(OSError):
        build_once(out, _complete, _raced_by(out, "partial"))
    assert _leftovers(tmp_path) == []
