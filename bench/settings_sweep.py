"""Does each setting reach what it tunes? One mutant per read of a setting, and the tests that should notice.

For every `settings.FIELD` read in the project's code (store/config.py's fields; store/config.py itself left
out), the read is replaced by the field's default (`Settings.model_construct().FIELD`): the code behaves as if
the variable were never set. The mutant is run against the test files that name FIELD or its environment
variable, or use a fixture or helper that does (a conftest.py's, below it; a helper module's, beside it); a
setting no test sets to another value cannot be told from its default there, so such a read shows as
"no test". Test files are run with `pytest -x`, on a detached worktree of HEAD, never on this checkout.

    .venv/bin/python bench/settings_sweep.py [--max-files 6] [--only proxy/,flows/]   # ~20-30 min on 2 cores

The table: each read (file:line, field), the verdict (killed, SURVIVED, no test, skipped: more test files than
--max-files, for the settings nearly every test sets, such as DATABASE_URL), and the test files run. A
survivor is a variable whose effect no test checks; an equivalent mutant (a read whose default gives the same
behaviour in every test, e.g. a floor that the default never passes) can survive too: read the line.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("proxy", "serving", "store", "experiment", "flows", "abloop", "retrieval", "training")
_READ = re.compile(r"\bsettings\.([a-z_]+)\b")


def fields(tree: Path) -> list[str]:
    return re.findall(r"^    ([a-z_]+):", (tree / "store" / "config.py").read_text(), re.M)


def reads(tree: Path, known: list[str], only: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """(path, line, field) for each read of a setting outside store/config.py."""
    found = []
    for package in PACKAGES:
        for path in sorted((tree / package).rglob("*.py")):
            relative = str(path.relative_to(tree))
            if relative == "store/config.py" or (only and not relative.startswith(only)):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                found += [(relative, number, m.group(1)) for m in _READ.finditer(line) if m.group(1) in known]
    return found


def naming_tests(tree: Path, field: str) -> list[str]:
    """The test files that name FIELD (or its variable), or use a fixture or helper of a conftest.py or helper
    module that does; a helper module's or conftest's use outside any definition brings its whole directory."""
    pattern = re.compile(rf"\b({field}|{field.upper()})\b")
    selected: set[Path] = set()
    for path in (tree / "tests").rglob("*.py"):
        text = path.read_text()
        if not pattern.search(text):
            continue
        if path.name.startswith("test_"):
            selected.add(path)
            continue
        below = path.parent.rglob("test_*.py") if path.name == "conftest.py" else path.parent.glob("test_*.py")
        names = _names_using(text, pattern)
        selected |= {test for test in below if names is None or any(re.search(rf"\b{n}\b", test.read_text())
                                                                       for n in names)}
    return sorted(str(p.relative_to(tree)) for p in selected)


def _names_using(source: str, pattern: re.Pattern[str]) -> set[str] | None:
    """The module's top-level functions, classes and constants whose code matches; None (every test) if a match is
    in a hook, an autouse fixture or a statement of the module itself."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        segment = ast.get_source_segment(source, node) or ""
        if not pattern.search(segment):
            continue
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (node.name.startswith("pytest_") or any(
                "autouse=True" in (ast.get_source_segment(source, d) or "") for d in node.decorator_list)):
            return None  # a hook or an autouse fixture: every test below
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        else:
            return None
    return names


def run_mutant(tree: Path, path: str, line: int, field: str, tests: list[str]) -> str:
    source_path = tree / path
    source = source_path.read_text()
    lines = source.splitlines(keepends=True)
    default = f'__import__("store.config", fromlist=["Settings"]).Settings.model_construct().{field}'
    lines[line - 1] = re.sub(rf"\bsettings\.{field}\b", default, lines[line - 1])
    source_path.write_text("".join(lines))
    # The caller's PYTEST_ADDOPTS could name a plugin the tree's PYTHONPATH does not reach.
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"} | {"HF_HUB_OFFLINE": "1",
                                                                          "PYTHONPATH": str(tree)}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:xdist", "-p", "no:cacheprovider", *tests],
            cwd=tree, capture_output=True, text=True, timeout=900, env=env,
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:
        source_path.write_text(source)
    # Only a failed test kills the mutant: pytest's other exits (interrupted, internal or usage error) say the run
    # itself broke, and counting them as kills would let a broken environment pass every mutant off as tested.
    return {0: "SURVIVED", 1: "killed", 5: "no test ran"}.get(result.returncode,
                                                              f"error (pytest exit {result.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-files", type=int, default=6, help="skip a read whose field more test files name")
    parser.add_argument("--only", default="", help="comma-separated path prefixes, e.g. proxy/,flows/")
    args = parser.parse_args()
    only = tuple(p for p in args.only.split(",") if p)
    with tempfile.TemporaryDirectory(prefix="settings-sweep-") as scratch:
        tree = Path(scratch) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), "HEAD"], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            known = fields(tree)
            print(f"settings sweep at {_head()}: {len(known)} settings\n")
            print("| read | field | verdict | test files |\n|---|---|---|---|")
            counts: dict[str, int] = {}
            for path, line, field in reads(tree, known, only):
                tests = naming_tests(tree, field)
                if not tests:
                    verdict = "no test"
                elif len(tests) > args.max_files:
                    verdict = f"skipped ({len(tests)} files)"
                else:
                    verdict = run_mutant(tree, path, line, field, tests)
                counts[verdict.split(" ")[0]] = counts.get(verdict.split(" ")[0], 0) + 1
                shown = " ".join(tests) if len(tests) <= args.max_files else "…"
                print(f"| {path}:{line} | {field} | {verdict} | {shown} |", flush=True)
            print("\n" + ", ".join(f"{verdict}: {n}" for verdict, n in sorted(counts.items())))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)


def _head() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


if __name__ == "__main__":
    main()
