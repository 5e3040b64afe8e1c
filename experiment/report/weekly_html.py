"""The weekly report as one self-contained HTML page, on the same frame, CSS, cards, tiles and charts as the
experiment report (`page`, `charts`): headline, week over week per group, the days, queries to review, prompt
templates, and what the arms were. A pure function of `experiment.weekly.week_over_week`'s bundle.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any

from experiment.metrics import ARMS
from experiment.report.charts import _interval_bar, _line_chart, _Series
from experiment.report.content import (
    _MISS_LISTS,
    _WEEKLY_GROUPS,
    _WEEKLY_ROWS,
    WEEKLY_NOTES,
    WEEKLY_SIMULATED_WHERE,
    _change_tone,
    _feedback_text,
    _miss_who,
    _simulated_text,
    _truncate,
    _weekly_cell,
    _weekly_figure,
    _weekly_title,
    _worst_feedback,
)
from experiment.report.format import _change, _change_interval, _e, _interval, _num, _pct, _value, _when
from experiment.report.page import _banner, _card, _notes_footer, _page, _tiles

_COLORS = {"last": "#64748b", "this": "#7c3aed"}  # the control and candidate colours: before and now


def render_weekly_html(bundle: dict[str, Any]) -> str:
    """The weekly report as one HTML document: inline CSS and SVG, no script, nothing fetched."""
    title = _weekly_title(bundle)
    sections = [_headline_section(bundle), _groups_section(bundle), _days_section(bundle), _misses_section(bundle),
                _templates_section(bundle), _experiments_section(bundle)]
    footer = _notes_footer(WEEKLY_NOTES, f"Generated {_when(bundle.get('generated_at'))} by abloop")
    return _page(title, "weekly report", bundle.get("generated_at"), _header(bundle, title), sections, footer)


def _header(bundle: dict[str, Any], title: str) -> str:
    week = bundle.get("week") or {}
    simulated = (bundle.get("simulated") or {}).get("both") or {}
    anonymous = bundle.get("anonymous_requests") or {}
    pill = '<span class="pill warn">simulated traffic</span>' if simulated.get("any") else ""
    meta = [("this week", _days(week.get("this"))), ("last week", _days(week.get("last"))),
            ("anonymous requests (left out)", f"{anonymous.get('last', 0):,} → {anonymous.get('this', 0):,}")]
    return "".join([
        '<header class="exp"><div class="wrap">', f"<h1>{_e(title)} {pill}</h1>",
        '<div class="meta">' + "".join(f"<span><b>{_e(k)}</b>{_e(v)}</span>" for k, v in meta) + "</div>",
        _banner(_simulated_text(simulated, WEEKLY_SIMULATED_WHERE)),
        "</div></header>"])


def _days(bounds: Sequence[str] | None) -> str:
    """[start, end) as the first and last day: "2025-06-02 – 2025-06-08"."""
    if not bounds:
        return "–"
    first = date.fromisoformat(bounds[0][:10])
    last = date.fromordinal(date.fromisoformat(bounds[1][:10]).toordinal() - 1)
    return f"{first.isoformat()} – {last.isoformat()}"


def _headline_section(bundle: dict[str, Any]) -> str:
    overall = (bundle.get("groups") or {}).get("overall") or {}
    tiles = []
    for key, label, kind, _count in _WEEKLY_ROWS[:4]:
        change = (overall.get("change") or {}).get(key) or {}
        last = _value(kind, _weekly_figure(overall.get("last"), key))
        interval = f" · 95% {_change_interval(change.get('ci'))}" if change.get("ci") else ""
        tiles.append((label, _value(kind, _weekly_figure(overall.get("this"), key)),
                      f"{_change(change.get('relative'))} vs {last} last week{interval}"))
    lead = "All traffic this week against last week; the tables below have every figure, per arm too."
    return _card("This week", _e(lead), _tiles(tiles), anchor="headline")


def _groups_section(bundle: dict[str, Any]) -> str:
    groups = bundle.get("groups") or {}
    body = []
    for name, heading in _WEEKLY_GROUPS.items():
        group = groups.get(name) or {}
        rows = []
        for key, label, kind, count in _WEEKLY_ROWS:
            change = (group.get("change") or {}).get(key) or {}
            bar = _interval_bar("relative", {"ci": change.get("ci"), "difference": change.get("relative"),
                                             "higher_is_better": change.get("higher_is_better")},
                                label=f"change interval {_change_interval(change.get('ci'))}")
            tone = _change_tone(change)
            rows.append(f"<tr><td>{_e(label)}</td>"
                        f'<td class="num">{_e(_weekly_cell(group.get("last"), key, kind, count))}</td>'
                        f'<td class="num">{_e(_weekly_cell(group.get("this"), key, kind, count))}</td>'
                        f'<td class="num"><span class="pill {tone}">{_e(_change(change.get("relative")))}</span></td>'
                        f'<td class="num">{_e(_change_interval(change.get("ci")))}</td><td>{bar}</td></tr>')
        body.append(f"<h3>{_e(heading)}</h3><table><thead><tr><th>figure</th><th class=num>last week</th>"
                    "<th class=num>this week</th><th class=num>change</th><th class=num>95% interval of the change</th>"
                    f"<th>interval vs 0</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    lead = ("Per group, this week against last; rates with their count in brackets. Green or red: the change's "
            "interval clears zero in the good or the bad direction. Per arm is by assigned arm.")
    return _card("Week over week", _e(lead), "".join(body), anchor="groups")


def _days_section(bundle: dict[str, Any]) -> str:
    days = bundle.get("days") or {}
    metric = "thumbs_up_per_request"
    series = []
    for week in ("last", "this"):
        points = days.get(week) or []
        line = _Series(name=f"{week} week", color=_COLORS[week], points=[], band=[])
        for n, day in enumerate(points, start=1):
            estimate = day.get(metric) or {}
            value, ci = _num(estimate.get("value")), estimate.get("ci")
            line.points.append((float(n), value))
            line.band.append((float(n), float(ci[0]), float(ci[1])) if ci and value is not None else None)
            line.tips.append(f"{day.get('date')} · {day.get('requests', 0):,} requests · "
                             f"{_value(metric, value)} {_interval(metric, ci, delta=False) if ci else ''}")
        series.append(line)
    chart = _line_chart(series, metric=metric, delta=False, height=280, markers=[], label=f"{metric} per day",
                        chart_id="days", x_label="day of the week (1 = its first day)")
    rows = "".join(
        f"<tr><td>day {n}</td>"
        + "".join(f'<td class="num">{_e(day.get("date"))}</td><td class="num">{day.get("requests", 0):,}</td>'
                  f'<td class="num">{_e(_value(metric, (day.get(metric) or {}).get("value")))}</td>'
                  for day in pair) + "</tr>"
        for n, pair in enumerate(zip(days.get("last") or [], days.get("this") or [], strict=False), start=1))
    table = ("<h3>Requests and thumbs-up per request by day</h3><table class=compact><thead><tr><th>day</th>"
             "<th class=num>last week</th><th class=num>requests</th><th class=num>thumbs-up</th>"
             "<th class=num>this week</th><th class=num>requests</th><th class=num>thumbs-up</th></tr></thead>"
             f"<tbody>{rows}</tbody></table>" if rows else "")
    legend = ('<div class="legend">' + "".join(f'<span><i style="background:{_COLORS[w]}"></i>{w} week</span>'
                                                for w in ("last", "this"))
              + '<span><i class="band" style="background:#7c3aed"></i>95% interval</span></div>')
    body = (legend + chart) if chart else '<div class="empty">No feedback in either week: nothing to chart.</div>'
    lead = "Thumbs-up per request, day by day, both weeks on one axis (users are the unit within each day)."
    return _card("By day", _e(lead), body + table, anchor="days")


def _misses_section(bundle: dict[str, Any]) -> str:
    misses = bundle.get("misses") or {}
    body = []
    for key, heading, worst in _MISS_LISTS:
        rows = [_miss_row(miss, worst) for miss in misses.get(key) or []]
        worst_head = {"satisfaction": "<th>worst feedback</th>", "score": "<th class=num>lowest score</th>",
                      None: ""}[worst]
        table = (f"<table><thead><tr><th>query</th><th class=num>times</th>{worst_head}<th>arm</th>"
                 f"<th>answer (worst case)</th><th>who</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
                 if rows else '<div class="empty">None this week.</div>')
        body.append(f"<h3>{_e(heading)}</h3>{table}")
    lead = ("This week's queries for a person to review: the worst-rated (thumbs down or a rating of 2 or less), the "
            "lowest automatic answer scores, and the answered queries that retrieval found nothing for.")
    return _card("Miss queries to review", _e(lead), "".join(body), anchor="misses")


def _miss_row(miss: dict[str, Any], worst: str | None) -> str:
    cells = [f'<td>{_e(_truncate(miss.get("query") or "", 200))}</td>',
             f'<td class="num">{miss.get("events", 0):,}</td>']
    if worst == "satisfaction":
        cells.append(f'<td>{_e("; ".join(_feedback_text([_worst_feedback(miss)])))}</td>')
    elif worst == "score":
        score = _num(miss.get("worst"))
        cells.append(f'<td class="num">{_e("–" if score is None else f"{score:.2f}")} '
                     f'<span class="sub">{_e(miss.get("method"))}</span></td>')
    cells.append(f'<td><span class="tag {_e(miss.get("arm"))}">{_e(miss.get("arm"))}</span></td>')
    cells.append(f'<td><div class="answer">{_e(_truncate(miss.get("answer") or "") or "(no answer)")}</div>'
                 f'<span class="sub">{_e(_when(miss.get("ts")))}</span></td>')
    cells.append(f"<td>{_who(miss)}</td>")
    return "<tr>" + "".join(cells) + "</tr>"


def _who(miss: dict[str, Any]) -> str:
    simulated = _miss_who(miss)
    return f'<span class="pill warn">{_e(simulated)}</span>' if simulated else '<span class="pill muted">user</span>'


def _templates_section(bundle: dict[str, Any]) -> str:
    rows = []
    for t in bundle.get("templates") or []:
        name = t.get("name") or ("(no template)" if not t.get("template_id") else "(unknown template)")
        version = f" v{t['version']}" if t.get("version") is not None else ""
        ident = (t.get("template_id") or "")[:8]
        thumbs = t.get("thumbs_up_per_request") or {}
        change = t.get("thumbs_up_change") or {}
        tokens = " / ".join(f"{v:,.0f}" if _num(v) is not None else "–"
                            for v in (t.get("tokens_in_per_request"), t.get("tokens_out_per_request")))
        rows.append(f'<tr><td><b>{_e(name)}{_e(version)}</b><span class="sub">{_e(ident)}</span></td>'
                    f'<td class="num">{t.get("requests", 0):,}</td><td class="num">{t.get("users", 0):,}</td>'
                    f'<td class="num">{_e(tokens)}</td>'
                    f'<td class="num">{_e(_value("latency_p95_ms", t.get("latency_p50_ms")))} / '
                    f'{_e(_value("latency_p95_ms", t.get("latency_p95_ms")))}</td>'
                    f'<td class="num">{_e(_value("thumbs_up_per_request", thumbs.get("value")))}'
                    f'<span class="sub">{_e(_interval("thumbs_up_per_request", thumbs.get("ci"), delta=False))}'
                    "</span></td>"
                    f'<td class="num">{_e(_change(change.get("relative")))}<span class="sub">'
                    f'{_e(_change_interval(change.get("ci")))}</span></td>'
                    f'<td class="num">{_e(_value("mean_rating", (t.get("mean_rating") or {}).get("value")))}</td>'
                    "</tr>")
    body = ("<table><thead><tr><th>prompt template</th><th class=num>requests</th><th class=num>users</th>"
            "<th class=num>tokens in / out per request</th><th class=num>latency p50 / p95</th>"
            "<th class=num>thumbs-up per request</th><th class=num>vs last week</th><th class=num>mean rating</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            if rows else '<div class="empty">No request this week.</div>')
    lead = "This week per prompt template id and version, busiest first; 95% intervals under the values."
    return _card("Prompt templates", _e(lead), body, anchor="templates")


def _experiments_section(bundle: dict[str, Any]) -> str:
    rows = []
    for e in bundle.get("experiments") or []:
        arms = " · ".join(f"{arm} {((e.get(arm) or {}).get('model')) or '–'}" for arm in ARMS)
        events = e.get("events") or {}
        rows.append(f'<tr><td><code>{_e(e.get("id", "")[:8])}</code></td><td>{_e(e.get("status"))}</td>'
                    f"<td>{_e(arms)}</td><td class=num>{_e(_pct(e.get('candidate_share')))}</td>"
                    f'<td class="num">{events.get("last", 0):,}</td><td class="num">{events.get("this", 0):,}</td>'
                    "</tr>")
    body = ("<table><thead><tr><th>experiment</th><th>status</th><th>arms (model)</th><th class=num>share now</th>"
            "<th class=num>requests last week</th><th class=num>requests this week</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>" if rows else '<div class="empty">No experiment logged.</div>')
    return _card("What the arms were", _e("The experiments that assigned this traffic, oldest first."), body,
                 anchor="experiments")
