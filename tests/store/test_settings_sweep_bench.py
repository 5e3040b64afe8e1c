"""bench/settings_sweep.py on a two-file project: what it counts as a read, which tests it picks, its verdicts."""

from __future__ import annotations

from pathlib import Path

from bench.settings_sweep import fields, naming_tests, reads, run_mutant

CONFIG = '''from pydantic_settings import BaseSettings


class Settings(BaseSettings):
    alpha: int = 1
    beta: str = "b"
'''


def _project(tmp_path: Path, test_body: str) -> Path:
    for relative, text in {
        "store/config.py": CONFIG,
        "proxy/part.py": "def tuned(settings):\n    return settings.alpha, settings.model_config\n",
        "tests/test_part.py": f"from proxy.part import tuned\nfrom store.config import Settings\n\n\n{test_body}",
        "tests/sub/conftest.py": "BETA = 'named here'\n",
        "tests/sub/test_more.py": "def test_nothing():\n    pass\n",
    }.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    return tmp_path


def test_reads_are_known_fields_and_tests_are_picked_by_name(tmp_path):
    tree = _project(tmp_path, "def test_alpha():\n    assert tuned(Settings(alpha=2))[0] == 2\n")
    assert fields(tree) == ["alpha", "beta"]
    assert reads(tree, fields(tree), only=()) == [("proxy/part.py", 2, "alpha")]  # model_config is no setting
    assert reads(tree, fields(tree), only=("flows/",)) == []
    assert naming_tests(tree, "alpha") == ["tests/test_part.py"]
    assert naming_tests(tree, "beta") == ["tests/sub/test_more.py"]  # the conftest brings its directory


def test_a_test_that_sets_the_value_kills_the_mutant_and_one_that_does_not_lets_it_survive(tmp_path):
    checked = _project(tmp_path / "checked", "def test_alpha():\n    assert tuned(Settings(alpha=2))[0] == 2\n")
    unchecked = _project(tmp_path / "unchecked", "def test_alpha():\n    assert tuned(Settings(alpha=2))\n")
    assert run_mutant(checked, "proxy/part.py", 2, "alpha", ["tests/test_part.py"]) == "killed"
    assert run_mutant(unchecked, "proxy/part.py", 2, "alpha", ["tests/test_part.py"]) == "SURVIVED"
    assert (checked / "proxy/part.py").read_text().endswith("settings.alpha, settings.model_config\n")  # put back
