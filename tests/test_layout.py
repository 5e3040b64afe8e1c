"""DESIGN's import direction, checked on the source: a new import that goes the wrong way fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"abloop", "flows", "proxy", "experiment", "training", "retrieval", "serving", "store"}
# What each package may import besides itself (DESIGN, "Import direction, one way only").
# One exception to DESIGN's "serving -> nothing of ours": serving reads the leaf `store` for process
# defaults (store.config.apply_runtime_env) and the device/dtype policy it shares with training
# (store.runtime); both import no torch, FastAPI or database driver at module import.
ALLOWED = {
    "abloop": OURS,
    "flows": {"experiment", "training", "retrieval", "store", "serving"},
    "proxy": {"experiment", "retrieval", "store"},
    "training": {"store", "retrieval"},
    "experiment": {"store"},
    "serving": {"store"},
    "retrieval": set(),
    "store": set(),
}
# A second, narrower exception: the auto-tune admin endpoints (DESIGN puts them on the proxy) run the
# same operation as the nightly `tune_prompts` flow, which is training's selection of logged answers;
# the proxy imports that one module, inside the handlers, rather than keeping a second copy.
# A third: the ONNX export of the embedding model and serving's converted base are cache directories
# built once across processes by the same lock (store.cachedir, which imports nothing but the standard
# library and store.flock); retrieval calls that function rather than keeping a second copy of it.
EXCEPTIONS = {("proxy/routes/prompts.py", "training.tuning"), ("retrieval/fast_embedder.py", "store.cachedir")}


def _modules(path: Path) -> set[str]:
    """The modules `path` imports anywhere (inside functions too), by full dotted name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def _imports(path: Path) -> set[str]:
    """Our top-level packages that `path` imports, leaving out the EXCEPTIONS."""
    relative = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    return {m.split(".")[0] for m in _modules(path) if (relative, m) not in EXCEPTIONS} & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_go_one_way(package):
    wrong = {
        str(path.relative_to(ROOT)): sorted(_imports(path) - ALLOWED[package] - {package})
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {path: names for path, names in wrong.items() if names} == {}


def test_the_check_sees_a_wrong_import(tmp_path):
    module = tmp_path / "leaf.py"
    module.write_text("import json\nfrom proxy.app import create_app\n\ndef f():\n    import flows.retrain\n")
    assert _imports(module) == {"proxy", "flows"}


def test_every_third_party_import_is_declared():
    """A module imported by the application must come from a distribution pyproject.toml names."""
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {_normalise(re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0]) for r in requirements}
    distributions = packages_distributions()
    modules = set().union(*(_third_party(path) for package in ALLOWED for path in (ROOT / package).rglob("*.py")))
    undeclared = {
        module: distributions.get(module)
        for module in modules - set(sys.stdlib_module_names)
        if not any(_normalise(d) in declared for d in distributions.get(module, [module]))
    }
    assert undeclared == {}


def _third_party(path: Path) -> set[str]:
    return {m.split(".")[0] for m in _modules(path)} - OURS


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_cache_builder_retrieval_may_use_imports_only_the_standard_library():
    """What the retrieval exception above rests on: store.cachedir pulls in nothing of ours but store.flock."""
    import sys

    for name in ("cachedir", "flock"):
        imported = _modules(ROOT / "store" / f"{name}.py") - {"__future__", "store.flock"}
        assert {m.split(".")[0] for m in imported} <= sys.stdlib_module_names, (name, imported)
