"""The value formatters shared by the HTML page and the markdown: metrics in their units, p-values, times.

`_e` escapes for HTML; every other formatter returns plain text (the caller escapes or markdown-quotes it).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from experiment.metrics import METRICS

_PERCENT = {"thumbs_up_per_request", "thumbs_up_rate", "feedback_rate", "correction_rate", "error_rate",
            "fallback_rate"}


def _e(value: Any) -> str:
    """Every piece of text in the page goes through here: queries, answers and names come from users and models."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _value(metric: str, value: Any) -> str:
    """A metric's value in its natural unit: rates as percentages, latency in ms."""
    v = _num(value)
    if v is None:
        return "–"
    if metric == "int":
        return f"{v:,.0f}"
    if metric in _PERCENT:
        return f"{v * 100:.1f}%"
    if metric == "latency_p95_ms":
        return f"{v:,.0f} ms"
    if metric == "mean_rating":
        return f"{v:.2f}"
    if metric == "tokens_out_per_request":
        return f"{v:.1f}"
    return f"{v:.3f}"


def _delta(metric: str, value: Any, sign: bool = True) -> str:
    """A difference of two values: percentage points for rates."""
    v = _num(value)
    if v is None:
        return "–"
    plus = "+" if sign else ""
    if metric in _PERCENT:
        return _signed(v * 100, f"{plus}.1f") + " pp"
    if metric == "latency_p95_ms":
        return _signed(v, f"{plus},.0f") + " ms"
    if metric == "mean_rating" or metric == "tokens_out_per_request":
        return _signed(v, f"{plus}.2f")
    return _signed(v, f"{plus}.3f")


def _signed(value: float, spec: str) -> str:
    """Format, but never as "-0.0": a difference that rounds to nothing has no direction."""
    text = format(value, spec)
    return format(0.0, spec) if text.lstrip("+-").strip("0.,") == "" else text


def _change(value: Any) -> str:
    """A relative change (0.1 is +10%), signed; "–" where there is none (nothing last week)."""
    v = _num(value)
    return "–" if v is None else _signed(v * 100, "+.1f") + "%"


def _change_interval(ci: Sequence[Any] | None) -> str:
    if not ci or _num(ci[0]) is None or _num(ci[1]) is None:
        return "–"
    return f"[{_change(ci[0])}, {_change(ci[1])}]"


def _interval(metric: str, ci: Sequence[Any] | None, delta: bool = True) -> str:
    if not ci or _num(ci[0]) is None or _num(ci[1]) is None:
        return "–"
    show = _delta if delta else _value
    return f"[{show(metric, ci[0])}, {show(metric, ci[1])}]"


def _p(value: Any) -> str:
    v = _num(value)
    if v is None:
        return "–"
    return "< 0.001" if v < 0.001 else f"{v:.3f}"


def _pct(value: Any, digits: int = 0) -> str:
    v = _num(value)
    return "–" if v is None else f"{v * 100:.{digits}f}%"


def _when(iso: str | None, seconds: bool = True) -> str:
    if not iso:
        return "–"
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC")


def _label(metric: str) -> str:
    return METRICS[metric].label if metric in METRICS else metric.replace("_", " ")


def _fixed(value: Any) -> str | None:
    v = _num(value)
    return None if v is None else f"{v:.4f}"
