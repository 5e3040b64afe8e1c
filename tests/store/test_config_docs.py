"""docs/CONFIGURATION.md's table is the settings class: every variable it reads is there, with its real default."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import SecretStr

from store.config import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFIGURATION.md"
_ROW = re.compile(r"^\| `([A-Z0-9_]+)` \| ([^|]+) \|", re.M)


def _documented() -> dict[str, str]:
    return {name: default.strip() for name, default in _ROW.findall(DOC.read_text(encoding="utf-8"))}


def _as_written(value: object) -> str:
    """A default as the table writes it: `unset` for none, else code-quoted: `0.2`, `30` (not 30.0), `./index`."""
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, Path) and not value.is_absolute():
        value = f"./{value}"
    return f"`{value}`"


def test_every_setting_is_documented_with_its_default():
    documented = _documented()
    defaults = Settings.model_construct()  # the class's defaults, whatever this process's environment holds
    missing = [name.upper() for name in Settings.model_fields if name.upper() not in documented]
    assert not missing, f"settings missing from {DOC.name}: {missing}"
    wrong = {
        name.upper(): (documented[name.upper()], _as_written(getattr(defaults, name)))
        for name, field in Settings.model_fields.items()
        if field.default_factory is None  # EMBEDDING_MODEL: a path found at run time, described in words
        and not documented[name.upper()].startswith(_as_written(getattr(defaults, name)))
    }
    assert not wrong, f"{DOC.name} says (documented, actual): {wrong}"


def test_the_check_reads_the_table():
    """A table the pattern no longer matched would make the test above pass on nothing."""
    documented = _documented()
    assert documented["LLM_TEMPERATURE"] == "`0.2`" and documented["LLM_API_KEY"] == "unset"
    assert len(documented) >= len(Settings.model_fields)
