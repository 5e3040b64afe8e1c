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
import subprocess
import sys
from collections.abc import Iterable
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


def prepare(bundle: Path, distributions: Iterable[str], python_version: str = DEVICE_PYTHON) -> list[Path]:
    """Download `distributions`, pinned to this environment's versions, into `bundle`/wheels.

    `--no-deps`: the list is the whole set to carry (what the other machine lacks or has at another
    version); a distribution not installed here is an error, not a guess at a version.
    """
    found = versions(distributions)
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


def versions(distributions: Iterable[str]) -> dict[str, str]:
    """The version of each distribution this process would import (or MISSING)."""
    found = {}
    for name in distributions:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = MISSING
    return found
