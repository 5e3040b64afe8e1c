"""A directory in the model cache, built once however many processes start at the same time.

The converted base model and the ONNX export of the embedding model are both built on a first start.
Several replicas or test workers starting together used to each build a copy in a temporary sibling and
race to rename it into place, all but one then throwing theirs away: N times the work on a machine that
was already busy. Now the first takes a lock beside the directory and builds; the others wait on the lock
and use its result. The rename stays atomic, so a builder the lock cannot see (another host over NFS,
where flock may be local) still loses the race cleanly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from store.flock import exclusive


def build_once(out: Path, is_complete: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """`out`, as it is if `is_complete(out)`, else made by `build(tmp)` and renamed into place."""
    out = Path(out)
    if is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out.parent / f".{out.name}.lock"):
        if is_complete(out):  # built by the process this one waited for
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any model dir
            for path in tmp.iterdir():
                path.chmod(0o644)
            try:
                os.rename(tmp, out)
            except OSError:
                if not is_complete(out):  # not someone else's finished copy: a real error
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
