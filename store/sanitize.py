"""Make a logged row storable on both databases: an event a user saw is never refused for its content.

What neither database takes as it is, though a request can carry it:
- NUL (`\\x00`): PostgreSQL's text columns refuse it (and `jsonb` refuses `\\u0000`);
- lone surrogates (`\\ud800`..`\\udfff`: JSON's `"\\ud800"` escape decodes to one): they cannot be
  encoded as UTF-8, so psycopg, sqlite3 and the spool file all fail on them;
- NaN and ±Infinity inside a JSON value: PostgreSQL's `json` refuses them.

The rule, applied once as a row enters the event writer (and to spool lines written before it):
each such character becomes U+FFFD, the replacement character (the text keeps its length and shows
where something was; stripping would also join the words either side), and each non-finite number
inside a JSON value becomes null.
Dictionary keys are treated like values. The row records what was changed:
`search_events.timings["sanitized"]` lists the changed columns. `feedback` has no column for that
(DESIGN.md's columns are kept), so the writer counts and logs it instead.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

REPLACEMENT = "\ufffd"
SANITIZED_KEY = "sanitized"  # in search_events.timings: the columns whose values were changed

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(table: str, row: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The row with every unstorable value replaced, and the names of the columns that changed.

    The row itself is returned (not a copy) when nothing needed changing, the common case.
    """
    changed = [column for column, value in row.items()
               if type(value) not in _PLAIN and _unstorable(value, in_json=False)]
    if not changed:
        return row, changed
    clean = dict(row)
    for column in changed:
        clean[column] = _clean(row[column], in_json=False)
    if table == "search_events":
        timings = clean.get("timings")
        clean["timings"] = {**(timings if isinstance(timings, dict) else {}), SANITIZED_KEY: sorted(changed)}
    return clean, changed


# A check that allocates nothing runs over every row; only a row that fails it is rebuilt. It
# dispatches on the exact type first: this runs on the event loop for every logged request.
_PLAIN = frozenset({int, bool, type(None), datetime})


def _unstorable(value: Any, *, in_json: bool = True) -> bool:
    kind = type(value)
    if kind is str:
        return _unstorable_text(value)
    if kind in _PLAIN:
        return False
    if isinstance(value, str):  # a str enum
        return _unstorable_text(value)
    if isinstance(value, dict):
        return any(_unstorable(key) or _unstorable(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return any(_unstorable(item) for item in value)
    if isinstance(value, float):
        # Only JSON refuses them: a float column (none in the logged tables yet) stores NaN.
        return in_json and not math.isfinite(value)
    return False


def _unstorable_text(text: str) -> bool:
    # Both checks run at C speed; the regex, ~100 times slower, only replaces once one is found.
    return "\x00" in text or (not text.isascii() and _has_surrogate(text))


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _clean(value: Any, *, in_json: bool = True) -> Any:
    if isinstance(value, str):
        return _UNSTORABLE.sub(REPLACEMENT, value) if _unstorable_text(value) else value
    if isinstance(value, float):
        return None if in_json and not math.isfinite(value) else value
    if isinstance(value, dict):
        return {_clean(key): _clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    return value
