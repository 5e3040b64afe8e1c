"""Wheels carried to a machine that cannot reach a package registry (the GPU machine).

Here, where pip reaches a registry, `prepare` downloads the wheels of the distributions a bench
needs at the versions installed in this environment (the versions the tests ran), built for the
other machine's Python; the folder travels beside the script. There, `activate` installs them into
a scratch folder with pip and runs the script again with that folder first on PYTHONPATH, so the
carried versions win over any the machine has and every subprocess the script starts sees them.
Only the standard library is imported here: nothing of the project may load before the wheels do.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

# The GPU machine's Python and platforms (its README: CPython 3.12, manylinux x86-64).
DEVICE_PYTHON = "3.12"
_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
MISSING = "missing"
_ACTIVE = "ABLOOP_CARRIED_SITE"  # set in the re-run process: the wheels are already on its path


def wheels_dir(bundle: Path) -> Path:
    return bundle / "wheels"


def _marker(bundle: Path) -> Path:
    return wheels_dir(bundle) / "PYTHON"  # the Python the wheels were downloaded for


def prepare(
    bundle: Path,
    distributions: Iterable[str],
    python_version: str = DEVICE_PYTHON,
    *,
    pinned: Mapping[str, str] | None = None,
) -> list[Path]:
    """Download `distributions`, pinned to this environment's versions, into `bundle`/wheels.

    `--no-deps`: the list is the whole set to carry (what the other machine lacks or has at another
    version); a distribution not installed here is an error, not a guess at a version. `pinned` adds
    distributions at given versions: an optional extra's, pinned in the project's constraints, that
    this environment does not install (`constraint_pins`).
    """
    found = {**versions(distributions), **(pinned or {})}
    missing = [name for name, version in found.items() if version == MISSING]
    if missing:
        raise SystemExit(f"{', '.join(missing)}: not installed here, so there is no tested version to carry")
    pins = [f"{name}=={version}" for name, version in found.items()]
    target = wheels_dir(bundle)
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob("*.whl"):
        stale.unlink()  # two versions of one distribution would stop the install there
    platforms = [arg for platform in _PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", python_version, "--implementation", "cp", *platforms, "--dest", str(target), *pins],
        check=True,
    )  # fmt: skip
    _marker(bundle).write_text(python_version + "\n", encoding="utf-8")
    return sorted(target.glob("*.whl"))


def activate(bundle: Path, argv: list[str]) -> None:
    """Install `bundle`'s wheels and re-run this process with them first on its path; no-op without any.

    Returns only when there is nothing to install, the wheels are for another Python (a bundle
    prepared for the GPU machine, seen where it was prepared), or this process is the re-run one.
    """
    wheels = sorted(wheels_dir(bundle).glob("*.whl"))
    if not wheels or os.environ.get(_ACTIVE):
        return
    marker = _marker(bundle)
    meant_for = marker.read_text(encoding="utf-8").strip() if marker.is_file() else "unknown"
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if meant_for != running:
        print(f"[carry] {bundle} holds wheels for Python {meant_for}, this is {running}: using the installed packages",
              file=sys.stderr, flush=True)  # fmt: skip
        return
    key = hashlib.sha256("\n".join(w.name for w in wheels).encode()).hexdigest()[:12]
    site = Path(os.environ.get("TMPDIR", "/tmp")) / f"abloop-carried-{key}"
    if not (site / ".complete").is_file():
        print(f"[carry] installing {len(wheels)} carried wheels into {site}", file=sys.stderr, flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
             "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)],
            check=True,
        )  # fmt: skip
        (site / ".complete").touch()
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, **{_ACTIVE: str(site)})
    os.execve(sys.executable, [sys.executable, *argv], env)


def constraint_pins(constraints: Path, names: Iterable[str]) -> dict[str, str]:
    """The `name==version` pins of `names` in a pip constraints file; a name without one is an error."""
    exact = {}
    for line in constraints.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*==\s*([^\s#;]+)\s*(#.*)?", line)
        if match:
            exact[_normalise(match[1])] = match[2]
    wanted = {name: exact.get(_normalise(name)) for name in names}
    unpinned = [name for name, version in wanted.items() if version is None]
    if unpinned:
        raise SystemExit(f"{', '.join(unpinned)}: no exact pin (name==version) in {constraints}")
    return wanted  # type: ignore[return-value]


def slim(wheel: Path, drop: Callable[[str], bool]) -> list[str]:
    """Rewrite `wheel` in place without the files `drop` selects; returns their names.

    For a wheel whose native libraries are built for every platform version (bitsandbytes ships
    one per CUDA release, 41 MiB): the other machine needs one of them, and a call carries 64 MiB.
    Their RECORD lines go too, so pip installs what is there without a missing file.
    """
    with zipfile.ZipFile(wheel) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    dropped = [info.filename for info, _ in entries if drop(info.filename)]
    if not dropped:
        return []
    gone = set(dropped)
    slimmed = wheel.with_name(wheel.name + ".slim")
    with zipfile.ZipFile(slimmed, "w", compression=zipfile.ZIP_DEFLATED) as target:
        for info, data in entries:
            if info.filename in gone:
                continue
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode("utf-8").splitlines(keepends=True)
                data = "".join(ln for ln in lines if ln.split(",", 1)[0] not in gone).encode("utf-8")
            target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    slimmed.replace(wheel)
    return dropped


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def versions(distributions: Iterable[str]) -> dict[str, str]:
    """The version of each distribution this process would import (or MISSING)."""
    found = {}
    for name in distributions:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = MISSING
    return found
