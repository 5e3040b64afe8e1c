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
        "tests/sub/test_more.py": "def test_beta():\n    from tests.sub.conftest import BETA\n",
        "tests/sub/test_other.py": "def test_nothing():\n    pass\n",
        "tests/fx/conftest.py": ("import pytest\n\n\n@pytest.fixture\ndef gamma_set(monkeypatch):\n"
                                 "    monkeypatch.setenv('GAMMA', '2')\n\n\n@pytest.fixture(autouse=True)\n"
                                 "def _delta_everywhere(monkeypatch):\n    monkeypatch.setenv('DELTA', '3')\n"),
        "tests/fx/test_uses.py": "def test_it(gamma_set):\n    pass\n",
        "tests/fx/test_does_not.py": "def test_it():\n    pass\n",
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
    assert naming_tests(tree, "beta") == ["tests/sub/test_more.py"]  # a conftest's constant: the tests that use it
    assert naming_tests(tree, "gamma") == ["tests/fx/test_uses.py"]  # a fixture: the tests that use it
    assert naming_tests(tree, "delta") == ["tests/fx/test_does_not.py", "tests/fx/test_uses.py"]  # autouse: all


def test_a_test_that_sets_the_value_kills_the_mutant_and_one_that_does_not_lets_it_survive(tmp_path):
    checked = _project(tmp_path / "checked", "def test_alpha():\n    assert tuned(Settings(alpha=2))[0] == 2\n")
    unchecked = _project(tmp_path / "unchecked", "def test_alpha():\n    assert tuned(Settings(alpha=2))\n")
    assert run_mutant(checked, "proxy/part.py", 2, "alpha", ["tests/test_part.py"]) == "killed"
    assert run_mutant(unchecked, "proxy/part.py", 2, "alpha", ["tests/test_part.py"]) == "SURVIVED"
    assert (checked / "proxy/part.py").read_text().endswith("settings.alpha, settings.model_config\n")  # put back


def test_a_run_that_breaks_before_its_tests_is_an_error_not_a_kill(tmp_path, monkeypatch):
    tree = _project(tmp_path, "def test_alpha():\n    assert tuned(Settings(alpha=2))[0] == 2\n")
    (tree / "tests/conftest.py").write_text("raise RuntimeError('a broken test environment')\n")
    assert run_mutant(tree, "proxy/part.py", 2, "alpha", ["tests/test_part.py"]) == "error (pytest exit 4)"
    (tree / "tests/conftest.py").unlink()
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p a_plugin_only_the_caller_has")  # not passed on to the mutant's run
    assert run_mutant(tree, "proxy/part.py", 2, "alpha", ["tests/test_part.py"]) == "killed"
