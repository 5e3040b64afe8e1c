"""The inline SVG charts: a line chart with always-valid bands and rollout markers, and the small interval bar.

No script and nothing fetched: every chart is drawn here as SVG text, and every label goes through `_e`.
The charts know nothing of the bundle: the page's chart section turns the timeline into `_Series`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from experiment.report.format import _PERCENT, _e, _interval, _num

_BOUNDS = {"mean_rating": (1.0, 5.0), "tokens_out_per_request": (0.0, math.inf)}  # default: a 0..1 ratio


@dataclass
class _Series:
    name: str
    color: str
    points: list[tuple[float, float | None]]
    band: list[tuple[float, float, float] | None] = field(default_factory=list)
    tips: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Frame:
    """Maps data to pixels inside the plot area of a `width` x `height` viewBox."""

    width: float
    height: float
    x0: float
    x1: float
    y0: float
    y1: float
    left: float = 64.0
    right: float = 20.0
    top: float = 26.0
    bottom: float = 36.0

    def x(self, value: float) -> float:
        span = self.x1 - self.x0 or 1.0
        return self.left + (value - self.x0) / span * (self.width - self.left - self.right)

    def y(self, value: float) -> float:
        span = self.y1 - self.y0 or 1.0
        return self.height - self.bottom - (value - self.y0) / span * (self.height - self.top - self.bottom)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (the usual 1-2-5 steps)."""
    span = high - low
    if span <= 0 or not math.isfinite(span):
        return [low]
    raw = span / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step + 1e-9) * step
    ticks = []
    value = start
    while value <= high + step * 1e-6 + step and len(ticks) < 20:
        ticks.append(round(value, 12))
        if value >= high - step * 1e-6:
            break
        value += step
    return ticks


def _domain(core: list[float], full: list[float], bounds: tuple[float, float], zero: bool) -> tuple[float, float]:
    """The y range: the values and final intervals, widened by early intervals only within reason.

    The first looks have very wide intervals; drawn in full they would flatten everything after.
    Points outside the range are clipped to the plot area.
    """
    if zero:
        core = [*core, 0.0]
    low, high = min(core), max(core)
    span = max(high - low, abs(high) * 0.05, 1e-6)
    low = max(min(full, default=low), low - 1.5 * span)
    high = min(max(full, default=high), high + 1.5 * span)
    low, high = max(low, bounds[0]), min(high, bounds[1])
    if high <= low:
        low, high = low - 0.5, high + 0.5
    pad = (high - low) * 0.06
    return low - pad, high + pad


def _fmt_axis(value: float, metric: str, delta: bool) -> str:
    if metric in _PERCENT:
        text = f"{value * 100:.{0 if abs(value) >= 0.1 or value == 0 else 1}f}"
        return f"{'+' if delta and value > 0 else ''}{text}{' pp' if delta else '%'}"
    text = f"{value:.3g}"
    return f"+{text}" if delta and value > 0 else text


def _line_chart(series: Sequence[_Series], *, metric: str, delta: bool, height: int, markers: Sequence[dict[str, Any]],
                label: str, chart_id: str, x_label: str = "users in the comparison (both arms)",
                x_tick: Callable[[float], str] = "{:,.0f}".format) -> str:
    width = 1000
    xs = [x for s in series for x, y in s.points if y is not None]  # the axis starts at the first look with a value
    core = [y for s in series for _, y in s.points if y is not None]
    full = [v for s in series for b in s.band if b for v in b[1:]]
    for s in series:  # the latest interval of each series always fits
        last = next((b for b in reversed(s.band) if b), None)
        if last:
            core.extend(last[1:])
    if not xs or not core:
        return ""
    x0, x1 = min(xs), max(xs)
    if x1 <= x0:
        x0, x1 = x0 - 1, x1 + 1
    low, high = _BOUNDS.get(metric, (0.0, 1.0))
    bounds = (low - high, high - low) if delta else (low, high)  # a difference of values in [a, b] is within ±(b - a)
    y0, y1 = _domain(core, full, bounds, zero=delta)
    frame = _Frame(width, height, x0, x1, y0, y1)
    plot_w, plot_h = width - frame.left - frame.right, height - frame.top - frame.bottom
    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="{_e(label)}" '
           f'preserveAspectRatio="xMidYMid meet">',
           f'<defs><clipPath id="{chart_id}-clip"><rect x="{frame.left}" y="{frame.top}" width="{plot_w}" '
           f'height="{plot_h}"/></clipPath></defs>',
           f'<rect x="{frame.left}" y="{frame.top}" width="{plot_w}" height="{plot_h}" class="plot"/>']
    for tick in _ticks(y0, y1):
        if y0 <= tick <= y1:
            y = frame.y(tick)
            out.append(f'<line x1="{frame.left}" x2="{width - frame.right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
            out.append(f'<text x="{frame.left - 8}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
                       f'{_e(_fmt_axis(tick, metric, delta))}</text>')
    for tick in _ticks(x0, x1, 8):
        if x0 <= tick <= x1 and float(tick).is_integer():
            x = frame.x(tick)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{height - frame.bottom}" '
                       f'y2="{height - frame.bottom + 4}" class="axis"/>')
            out.append(f'<text x="{x:.1f}" y="{height - frame.bottom + 18}" class="tick" text-anchor="middle">'
                       f'{_e(x_tick(tick))}</text>')
    out.append(f'<text x="{width - frame.right}" y="{height - 4}" class="axis-label" text-anchor="end">'
               f'{_e(x_label)}</text>')
    out.append(f'<g clip-path="url(#{chart_id}-clip)">')
    if delta and y0 < 0 < y1:
        out.append(f'<line x1="{frame.left}" x2="{width - frame.right}" y1="{frame.y(0):.1f}" y2="{frame.y(0):.1f}" '
                   'class="zero"/>')
    for s in series:
        for run in _runs(s.band):
            upper = " ".join(f"{frame.x(x):.1f},{frame.y(hi):.1f}" for x, _lo, hi in run)
            lower = " ".join(f"{frame.x(x):.1f},{frame.y(lo):.1f}" for x, lo, _hi in reversed(run))
            out.append(f'<polygon points="{upper} {lower}" fill="{s.color}" fill-opacity="0.14" stroke="{s.color}" '
                       'stroke-opacity="0.35" stroke-width="1"/>')
    for s in series:
        for run in _runs([(x, y) if y is not None else None for x, y in s.points]):
            path = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in run)
            out.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="2.5" '
                       'stroke-linejoin="round"/>')
        for n, (x, y) in enumerate(s.points):
            if y is not None:
                tip = s.tips[n] if n < len(s.tips) else ""
                out.append(f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="3.5" fill="#fff" '
                           f'stroke="{s.color}" stroke-width="2"><title>{_e(tip)}</title></circle>')
    out.append("</g>")
    for marker in markers:
        users = _num(marker.get("users"))
        if users is None or not x0 <= users <= x1:
            continue
        x = frame.x(users)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{frame.top}" y2="{height - frame.bottom}" class="marker">'
                   f'<title>{_e(marker.get("title"))}</title></line>')
        out.append(f'<text x="{x + 4:.1f}" y="{frame.top - 8}" class="marker-label">{_e(marker.get("label"))}</text>')
    out.append("</svg>")
    return "".join(out)


def _runs(items: Iterable[Any]) -> list[list[Any]]:
    """Contiguous stretches of non-None items (a line or band breaks where a look had no value)."""
    runs: list[list[Any]] = [[]]
    for item in items:
        if item is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(item)
    return [run for run in runs if run]


def _interval_bar(metric: str, comparison: dict[str, Any], label: str | None = None) -> str:
    """A small bar of the difference's interval around zero, green/red where it clears zero (GrowthBook's style).

    `label` names the interval for screen readers (default: the interval in the metric's unit).
    """
    ci = comparison.get("ci") or [None, None]
    low, high, point = _num(ci[0]), _num(ci[1]), _num(comparison.get("difference"))
    if low is None or high is None or point is None:
        return ""
    reach = max(abs(low), abs(high), 1e-12) * 1.15
    width, height = 150, 22

    def x(value: float) -> float:
        return width / 2 + value / reach * (width / 2 - 4)

    better_up = comparison.get("higher_is_better", True)
    if low > 0 or high < 0:
        good = (low > 0) == better_up
        color = "#059669" if good else "#dc2626"
    else:
        color = "#94a3b8"
    return (f'<svg class="ci-bar" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{_e(label or f"interval {_interval(metric, ci)}")}">'
            f'<line x1="{width / 2}" x2="{width / 2}" y1="1" y2="{height - 1}" stroke="#475569" stroke-width="1"/>'
            f'<rect x="{x(low):.1f}" y="6" width="{max(x(high) - x(low), 1.5):.1f}" height="10" rx="3" '
            f'fill="{color}" fill-opacity="0.75"/>'
            f'<circle cx="{x(point):.1f}" cy="11" r="3.2" fill="#fff" stroke="{color}" stroke-width="2"/></svg>')
