"""The experiment report as one self-contained HTML page: `render_html` and its sections, verdict first.

The file must open anywhere (a laptop on a plane, an artifact store, an email attachment), so it
has no JavaScript and references nothing outside itself: CSS is inline (the frame and CSS are `page`'s,
shared with the weekly report) and the charts are SVG drawn by `charts`. Queries, answers, model names
and reasons come from users or models, so every piece of text is escaped (`_e`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from experiment import phases
from experiment.metrics import ARMS
from experiment.report.charts import _interval_bar, _line_chart, _Series
from experiment.report.content import (
    _ARM_ROWS,
    ANSWER_CHARS,
    METHOD_NOTES,
    _arm_name,
    _feedback_text,
    _share_move,
    _simulated_text,
    _verdict,
)
from experiment.report.format import _delta, _e, _fixed, _interval, _label, _num, _p, _pct, _value, _when
from experiment.report.page import _banner, _card, _notes_footer, _page, _tiles
from experiment.status import arm_label
from store.experiments import RUNNING

# Markers on the charts: every share-setting transition after the start, and the end.
SHARE_KINDS = tuple(kind for kind in phases.SHARE_KINDS if kind != "start")
END_KINDS = phases.END_KINDS


def render_html(bundle: dict[str, Any]) -> str:
    """The report as one HTML document: inline CSS and SVG, no script, nothing fetched."""
    experiment = bundle.get("experiment") or {}
    title = f"Experiment {experiment['id'][:8]}" if experiment.get("id") else "Experiment report"
    sections = [_verdict_section(bundle), _chart_section(bundle), _metrics_section(bundle), _guardrail_section(bundle),
                _transition_section(bundle), _phase_section(bundle), _example_section(bundle),
                _offline_section(bundle)]
    return _page(title, "experiment report", bundle.get("generated_at"), _header(bundle, title), sections,
                 _footer(bundle))


def _header(bundle: dict[str, Any], title: str) -> str:
    experiment = bundle.get("experiment") or {}
    _action, headline, tone, _reason = _verdict(bundle)
    status = experiment.get("status")
    status_tone = {"running": "info", "promoted": "good", "rolled_back": "bad"}.get(status or "", "muted")
    parts = ['<header class="exp"><div class="wrap">',
             f'<h1>{_e(title)} <span class="pill {status_tone}">{_e(status or "no experiment")}</span> '
             f'<span class="pill {tone}">{_e(headline)}</span></h1>']
    if experiment.get("id"):
        parts.append(f'<div class="id">{_e(experiment["id"])}</div>')
    analysis = bundle.get("analysis") or {}
    share = experiment.get("candidate_share")
    meta = [("report on", bundle.get("selection")),
            ("started", _when(experiment.get("started_at"), False) if experiment.get("started_at") else None),
            ("ended", _when(experiment.get("ended_at"), False) if experiment.get("ended_at") else None),
            ("candidate share", _pct(share) if share is not None else None),
            ("primary metric", analysis.get("primary_metric"))]
    parts.append('<div class="meta">' + "".join(f"<span><b>{_e(k)}</b>{_e(v)}</span>" for k, v in meta if v)
                 + "</div>")
    if experiment:
        parts.append('<div class="arms">')
        for arm in ARMS:
            described = experiment.get(arm)
            users = (analysis.get("arms") or {}).get(arm, {}).get("users")
            if described:
                adapter = f" · adapter {described['adapter_id']}" if described.get("adapter_id") else ""
                sub = f"{described.get('base_url')}{adapter} · {users or 0:,} users"
                name = arm_label(described, arm)
            else:
                name, sub = "no candidate arm", "every user is served by control"
            parts.append(f'<div class="arm"><span class="tag {arm}">{arm}</span><span class="name">{_e(name)}</span>'
                         f'<div class="sub">{_e(sub)}</div></div>')
        parts.append("</div>")
    parts.append(_banner(_simulated_text(bundle.get("simulated"))))
    if experiment and status != RUNNING:
        ended = f" on {_when(experiment.get('ended_at'))}" if experiment.get("ended_at") else ""
        parts.append(f'<div class="note">This experiment ended as <b>{_e(status)}</b>{_e(ended)}. Reporting '
                     f'{_e(bundle.get("selection"))}.</div>')
    parts.append("</div></header>")
    return "".join(parts)


def _verdict_section(bundle: dict[str, Any]) -> str:
    action, headline, tone, reason = _verdict(bundle)
    analysis = bundle.get("analysis") or {}
    primary = analysis.get("primary") or {}
    metric = analysis.get("primary_metric") or "satisfaction"
    body = [f'<div class="action">{_e(headline)}<code>{_e(action)}</code></div>',
            f'<div class="reason">{_e(reason)}</div>']
    arms = primary.get("arms") or {}
    figures = []
    for arm in ARMS:
        value = arms.get(arm) or {}
        figures.append((f"{arm} · {_arm_name(bundle, arm)}", _value(metric, value.get("value")),
                        f"always-valid {_interval(metric, value.get('ci'), delta=False)} · "
                        f"{(analysis.get('arms') or {}).get(arm, {}).get('users', 0):,} users"))
    figures.append(("difference (candidate − control)", _delta(metric, primary.get("difference")),
                    f"always-valid 95% {_interval(metric, primary.get('ci'))}"))
    figures.append(("chance candidate is better", _pct(primary.get("chance_to_win"), 1),
                    f"relative {_pct(primary.get('relative'), 1) if primary.get('relative') is not None else '–'}"))
    body.append(_tiles(figures))
    recorded = (bundle.get("experiment") or {}).get("recorded_decision") or {}
    if recorded:
        said = recorded.get("action") or (bundle.get("experiment") or {}).get("status")
        rollout = recorded.get("rollout")
        extra = f" · rollout: {rollout.get('did')}" if isinstance(rollout, dict) and rollout.get("did") else ""
        when = f" (evaluated {_when(recorded['evaluated_at'])})" if recorded.get("evaluated_at") else ""
        body.append(f'<div class="recorded"><b>Last decision recorded on the experiment{_e(when)}:</b> {_e(said)} — '
                    f"{_e(recorded.get('reason'))}{_e(extra)}</div>")
    body.append(f'<p class="lead" style="margin:12px 0 0">Primary metric: <b>{_e(_label(metric))}</b>. The decision '
                "reads only the always-valid interval of the difference; guardrails and the sample-ratio check come "
                "first.</p>")
    return _card("Verdict", "", "".join(body), f"verdict {tone}", "verdict")


def _chart_section(bundle: dict[str, Any]) -> str:
    analysis = bundle.get("analysis") or {}
    metric = analysis.get("primary_metric") or "satisfaction"
    points = bundle.get("timeline") or []
    markers = _markers(bundle.get("transitions") or [])
    arms, difference = [], None
    if points:
        colors = {"control": "#64748b", "candidate": "#7c3aed"}
        for arm in ARMS:
            arms.append(_arm_series(points, arm, colors[arm], metric, _arm_name(bundle, arm)))
        difference = _difference_series(points, metric)
    value_chart = _line_chart(arms, metric=metric, delta=False, height=320, markers=markers,
                              label=f"{metric} per arm over time", chart_id="value") if points else ""
    diff_chart = _line_chart([difference], metric=metric, delta=True, height=230, markers=markers,
                             label=f"{metric} difference over time", chart_id="diff") if difference else ""
    if not value_chart and not diff_chart:
        body = '<div class="empty">Not enough data for a chart yet: no look had a value for both arms.</div>'
    else:
        marker_legend = '<span><i class="mark"></i>rollout / share change</span>' if markers else ""
        first, last = points[0].get("ts"), points[-1].get("ts")
        control, candidate = _e(_arm_name(bundle, "control")), _e(_arm_name(bundle, "candidate"))
        body = (f'<div class="legend"><span><i style="background:#64748b"></i>control · {control}</span>'
                f'<span><i style="background:#7c3aed"></i>candidate · {candidate}</span>'
                '<span><i class="band" style="background:#7c3aed"></i>always-valid 95% band</span>'
                f"{marker_legend}</div>{value_chart}"
                "<h3>Difference (candidate − control) with its confidence sequence</h3>"
                '<div class="legend"><span><i style="background:#7c3aed"></i>difference</span>'
                f'<span><i style="background:#111827"></i>zero: no difference</span></div>{diff_chart}'
                f'<p class="lead">{len(points)} looks from {_e(_when(first))} to {_e(_when(last))}; each '
                "re-analyses the experiment as it stood then, so the band is what an operator would have seen. "
                "Hover a point for its time. Bands wider than the plot are clipped to the metric's possible range. "
                "The decision is promote once the band lies above zero, roll back once it lies below.</p>")
    lead = f"{_e(_label(metric))}, per arm and as a difference, over the course of the experiment."
    return _card("Primary metric over time", lead, body, anchor="timeline")


def _markers(transitions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    markers = []
    for t in transitions:
        kind = t.get("kind")
        if kind in SHARE_KINDS:
            label = f"→ {_pct(t.get('to_share'))}"
        elif kind in END_KINDS:
            label = str(kind).replace("_", " ")
        else:
            continue
        markers.append({"users": t.get("users"), "label": label,
                        "title": f"{_when(t.get('ts'))} · {kind}: {t.get('reason') or ''}"})
    return markers


def _arm_series(points: Sequence[dict[str, Any]], arm: str, color: str, metric: str, name: str) -> _Series:
    series = _Series(name=arm, color=color, points=[], band=[])
    for point in points:
        x = float(sum(point.get("users") or [0, 0]))
        value = ((point.get("arms") or {}).get(arm)) or {}
        y, ci = _num(value.get("value")), value.get("ci")
        series.points.append((x, y))
        ok = ci and _num(ci[0]) is not None and _num(ci[1]) is not None
        series.band.append((x, float(ci[0]), float(ci[1])) if ok else None)
        series.tips.append(f"{_when(point.get('ts'))} · {int(x):,} users · {arm} ({name}) {_value(metric, y)} "
                           f"{_interval(metric, ci, delta=False) if ok else ''}")
    return series


def _difference_series(points: Sequence[dict[str, Any]], metric: str) -> _Series | None:
    series = _Series(name="difference", color="#7c3aed", points=[], band=[])
    for point in points:
        x = float(sum(point.get("users") or [0, 0]))
        y, ci = _num(point.get("difference")), point.get("ci")
        series.points.append((x, y))
        ok = ci and _num(ci[0]) is not None and _num(ci[1]) is not None
        series.band.append((x, float(ci[0]), float(ci[1])) if ok else None)
        series.tips.append(f"{_when(point.get('ts'))} · {int(x):,} users · difference {_delta(metric, y)} "
                           f"{_interval(metric, ci) if ok else ''} · {point.get('action') or ''}")
    return series if any(y is not None for _, y in series.points) else None


def _metrics_section(bundle: dict[str, Any]) -> str:
    analysis = bundle.get("analysis") or {}
    metrics = analysis.get("metrics") or {}
    primary_name = analysis.get("primary_metric")
    rows = []
    order = [primary_name, *[m for m in metrics if m != primary_name]] if primary_name in metrics else list(metrics)
    for name in order:
        comparison = metrics.get(name)
        if not comparison:
            rows.append(f'<tr><td>{_e(name)}<span class="sub">{_e(_label(name))}</span></td>'
                        '<td class="num" colspan="8">no data in one arm</td></tr>')
            continue
        cuped = comparison.get("cuped") or {}
        reduction = _num(cuped.get("variance_reduction")) if isinstance(cuped, dict) else None
        fixed = comparison.get("fixed_horizon") or {}
        direction = "higher is better" if comparison.get("higher_is_better", True) else "lower is better"
        star = " ★ primary" if name == primary_name else ""
        rows.append(
            f'<tr class="{"primary" if name == primary_name else ""}">'
            f'<td><b>{_e(name)}</b>{_e(star)}<span class="sub">{_e(_label(name))} · {direction}</span></td>'
            f'<td class="num">{_e(_value(name, comparison.get("control")))}</td>'
            f'<td class="num">{_e(_value(name, comparison.get("candidate")))}</td>'
            f'<td class="num"><b>{_e(_delta(name, comparison.get("difference")))}</b></td>'
            f'<td class="num">{_e(_interval(name, comparison.get("ci")))}</td>'
            f"<td>{_interval_bar(name, comparison)}</td>"
            f'<td class="num">{_e(_pct(comparison.get("chance_to_win"), 1))}</td>'
            f'<td class="num">{_e(_p(fixed.get("p_value")))}</td>'
            f'<td class="num">{_e(_pct(reduction, 0) if reduction is not None else "–")}</td></tr>')
    if rows:
        comparison_table = (
            "<table><thead><tr><th>metric</th><th class=num>control</th><th class=num>candidate</th>"
            "<th class=num>difference</th><th class=num>always-valid 95% interval</th><th>interval vs 0</th>"
            "<th class=num>chance to win</th><th class=num>fixed-horizon p (reference only)</th>"
            f"<th class=num>CUPED variance cut</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    else:
        comparison_table = '<div class="empty">No comparison yet: the experiment needs users in both arms.</div>'
    arms = analysis.get("arms") or {}
    arm_rows = "".join(
        f"<tr><td>{_e(label)}</td>"
        + "".join(f'<td class="num">{_e(_value(kind, (arms.get(arm) or {}).get(key)))}</td>' for arm in ARMS)
        + "</tr>"
        for key, label, kind in _ARM_ROWS if any((arms.get(arm) or {}).get(key) is not None for arm in ARMS))
    arm_table = (f'<h3>Per-arm figures (by assigned arm)</h3><table class="compact"><thead><tr><th>figure</th>'
                 f'<th class=num>control<br><span class="nm">{_e(_arm_name(bundle, "control"))}</span></th>'
                 f'<th class=num>candidate<br><span class="nm">{_e(_arm_name(bundle, "candidate"))}</span></th>'
                 "</tr></thead>"
                 f"<tbody>{arm_rows}</tbody></table>")
    assignment = analysis.get("assignment") or {}
    notes = ""
    if assignment:
        notes = (f'<p class="lead" style="margin-top:10px">Assignment: {_e(assignment.get("rule"))}; '
                 f'{assignment.get("users_left_out", 0):,} users left out whose bucket a share change moved; '
                 f'{assignment.get("users_in_both_arms", 0):,} users seen in both arms; '
                 f'{assignment.get("anonymous_requests", 0):,} anonymous requests (never randomised) left out.</p>')
    lead = ("Candidate − control per metric, with the always-valid 95% interval that decisions use. Rates are in "
            "percent, differences in percentage points (pp). Green: the interval clears zero in the candidate's "
            "favour; red: against it.")
    return _card("Metrics per arm", lead, comparison_table + arm_table + notes, anchor="metrics")


def _guardrail_section(bundle: dict[str, Any]) -> str:
    analysis = bundle.get("analysis") or {}
    guardrails = analysis.get("guardrails") or {}
    results = guardrails.get("results") or {}
    configured = {g.get("metric"): g for g in ((analysis.get("policy") or {}).get("guardrails") or [])}
    rows = []
    for name, result in results.items():
        status = result.get("status", "no data")
        tone = {"ok": "good", "breached": "bad", "waiting for sample": "warn"}.get(status, "muted")
        config = configured.get(name) or {}
        allowed = _delta(name, result.get("margin"), sign=False)
        if config.get("relative") and allowed != "–":
            allowed += f" ({_pct(config.get('margin'))} of control)"
        higher = (analysis.get("metrics") or {}).get(name, {}) or {}
        worse = "lower" if higher.get("higher_is_better", True) else "higher"
        rows.append(f"<tr><td><b>{_e(name)}</b><span class=sub>{_e(_label(name))}</span></td>"
                    f'<td><span class="pill {tone}">{_e(status)}</span></td>'
                    f'<td class="num">{_e(allowed)} {_e(worse if allowed != "–" else "")}</td>'
                    f'<td class="num">{_e(_delta(name, result.get("difference")))}</td>'
                    f'<td class="num">{_e(_interval(name, result.get("ci")))}</td></tr>')
    breached = guardrails.get("breached") or []
    body = ""
    if breached:
        body += '<div class="banner" style="margin:0 0 12px">' + "<br>".join(_e(b) for b in breached) + "</div>"
    if rows:
        body += ("<table><thead><tr><th>guardrail</th><th>status</th><th class=num>allowed to be worse by</th>"
                 "<th class=num>difference</th><th class=num>always-valid 95% interval</th></tr></thead>"
                 f"<tbody>{''.join(rows)}</tbody></table>")
    else:
        body += '<div class="empty">No guardrail checked yet.</div>'
    checked = "checked" if guardrails.get("checked") else "not checked yet: waiting for the minimum sample per arm"
    lead = (f"One-sided tests against a margin on the always-valid interval; breached only when the whole interval is "
            f"worse than the margin. Status: {_e(checked)}.")
    return _card("Guardrails", lead, body, anchor="guardrails")


def _transition_section(bundle: dict[str, Any]) -> str:
    transitions = bundle.get("transitions") or []
    experiment = bundle.get("experiment") or {}
    rows = "".join(
        f'<tr><td class="nowrap">{_e(_when(t.get("ts")))}</td><td><span class="pill {_kind_tone(t.get("kind"))}">'
        f'{_e(t.get("kind"))}</span></td><td class="num">{_e(_share_move(t))}</td>'
        f'<td class="num">{t.get("users") or 0:,}</td><td class="reason-cell">{_e(t.get("reason"))}</td></tr>'
        for t in transitions)
    body = ("<table><thead><tr><th>time</th><th>kind</th><th class=num>share</th>"
            f"<th class=num>users by then</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table>"
            if rows else '<div class="empty">No transition recorded.</div>')
    rollout = experiment.get("rollout")
    if isinstance(rollout, dict) and rollout.get("steps"):
        steps = " → ".join(_pct(s) for s in rollout["steps"])
        step = rollout.get("step")
        approve = "yes" if rollout.get("auto_promote") else "no (an operator approves)"
        body = (f'<p class="lead">Rollout plan: {_e(steps)}; at step {_e((step or 0) + 1)}; at least '
                f'{_e(rollout.get("min_users_per_step"))} users and {_e(rollout.get("min_hours_per_step"))} h per '
                f"step; auto-promote {_e(approve)}.</p>") + body
    return _card("Rollout & transitions", "Every change of the split or state, oldest first, with its reason.", body,
                 anchor="transitions")


def _kind_tone(kind: Any) -> str:
    return {"promoted": "good", "rolled_back": "bad", "stopped": "muted", "start": "info"}.get(str(kind), "warn")


def _phase_section(bundle: dict[str, Any]) -> str:
    analysis = bundle.get("analysis") or {}
    phases = analysis.get("phases") or []
    rows = []
    for phase in phases:
        users = phase.get("users") or [0, 0]
        expected = phase.get("expected")
        expected_text = "–" if not expected else f"{expected[0]:,.1f} / {expected[1]:,.1f}"
        if phase.get("mismatch"):
            verdict = '<span class="pill bad">mismatch</span>'
        elif phase.get("p_value") is None:
            verdict = '<span class="pill muted">not testable</span>'
        else:
            verdict = '<span class="pill good">ok</span>'
        rows.append(f'<tr><td>phase {_e(phase.get("index", 0) + 1)}<span class="sub">{_e(phase.get("reason"))}</span>'
                    f'</td><td class="num">{_e(_pct(phase.get("share")))}</td>'
                    f'<td class="num">{_e(_when(phase.get("start")))}<span class="sub">to '
                    f'{_e(_when(phase.get("end")) if phase.get("end") else "now")}</span></td>'
                    f'<td class="num">{users[0]:,} / {users[1]:,}</td><td class="num">{_e(expected_text)}</td>'
                    f'<td class="num">{_e(_p(phase.get("p_value")))}</td><td>{verdict}</td></tr>')
    body = ("<table><thead><tr><th>phase</th><th class=num>candidate share</th><th class=num>from</th>"
            "<th class=num>users control / candidate</th><th class=num>expected</th><th class=num>p-value</th>"
            f"<th>split</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            if rows else '<div class="empty">No phase with users yet.</div>')
    threshold = (analysis.get("srm") or {}).get("threshold")
    lead = ("Chi-square per phase, against that phase's share, on the users first seen in it by their arm then"
            f"{f'; p < {threshold} flags a broken split and blocks any decision' if threshold else ''}.")
    return _card("Sample-ratio check per phase", _e(lead), body, anchor="phases")


def _example_section(bundle: dict[str, Any]) -> str:
    examples = bundle.get("examples") or {}
    rows = examples.get("rows") or []
    if not rows:
        return _card("Example answers side by side", "", '<div class="empty">No answered request logged yet.</div>',
                     anchor="examples")
    pairs = examples.get("mode") == "pairs"
    blocks = []
    for row in rows:
        query = row.get("query")
        head = (f'<div class="q"><span>query</span>{_e(query)}</div>' if pairs
                else '<div class="q"><span>latest answer of each arm</span></div>')
        cols = "".join(_answer_cell(bundle, arm, (row.get("arms") or {}).get(arm), show_query=not pairs)
                       for arm in ARMS)
        blocks.append(f'<div class="pair">{head}<div class="cols">{cols}</div></div>')
    lead = ("The newest queries that both arms answered (by the arm that served them), truncated to "
            f"{ANSWER_CHARS} characters, with the feedback they got."
            if pairs else "No query was answered by both arms yet; these are the latest answers of each arm.")
    return _card("Example answers side by side", _e(lead), "".join(blocks), anchor="examples")


def _answer_cell(bundle: dict[str, Any], arm: str, answer: dict[str, Any] | None, show_query: bool) -> str:
    header = f'<span class="tag {arm}">{arm}</span><b>{_e(_arm_name(bundle, arm))}</b>'
    if not answer:
        return f'<div class="col">{header}<div class="answer"><i>no answer logged</i></div></div>'
    sim = answer.get("simulated")
    meta = [_when(answer.get("ts")), answer.get("status")]
    if answer.get("assigned_arm") and answer.get("assigned_arm") != arm:
        meta.append(f"fallback from {answer['assigned_arm']}")
    parts = [f'<div class="col">{header} <span class="pill {"warn" if sim else "muted"}">'
             f'{"simulated user" if sim else "user"}</span>',
             f'<div class="sub" style="color:#6b7280;font-size:12px">{_e(" · ".join(m for m in meta if m))}</div>']
    if show_query:
        parts.append(f'<div class="sub" style="font-size:12px"><b>query:</b> {_e(answer.get("query"))}</div>')
    parts.append(f'<div class="answer">{_e(answer.get("answer"))}</div>')
    parts.append(_feedback_html(answer.get("feedback") or [], bool(sim)))
    parts.append("</div>")
    return "".join(parts)


def _feedback_html(feedback: Sequence[dict[str, Any]], simulated: bool) -> str:
    lines = _feedback_text(feedback)
    who = '<span class="sim">SIMULATED feedback</span>' if simulated else "<b>feedback</b>"
    if not lines:
        return f'<div class="fb">{who}: none</div>' if simulated else '<div class="fb">no feedback</div>'
    return f'<div class="fb">{who}: ' + "<br>".join(_e(line) for line in lines) + "</div>"


def _offline_section(bundle: dict[str, Any]) -> str:
    gate = bundle.get("offline_gate")
    lead = "The adapter's offline evaluation on the training holdout, before any user saw it."
    if not gate:
        return _card("Offline gate", lead, '<div class="empty">The candidate is not a registered adapter: '
                     "no offline gate was run for it.</div>", anchor="offline")
    if gate.get("missing"):
        return _card("Offline gate", lead, f'<div class="empty">Adapter {_e(gate.get("adapter_id"))} is not in the '
                     "adapters table.</div>", anchor="offline")
    evaluation = gate.get("eval_metrics") or {}
    train = gate.get("train_metrics") or {}
    body = [f'<p><b>{_e(gate.get("name"))}</b> on {_e(gate.get("base_model"))} · registered '
            f'{_e(_when(gate.get("created_at")))}'
            + (f' · dataset {_e(str(gate.get("dataset_hash"))[:12])}' if gate.get("dataset_hash") else "") + "</p>"]
    if not evaluation:
        body.append('<div class="empty">No offline evaluation recorded for this adapter.</div>')
    else:
        passed = evaluation.get("passed")
        body.append(f'<p><span class="pill {"good" if passed else "bad"}">'
                    f'{"gate passed" if passed else "gate failed"}</span> '
                    + _e("; ".join(evaluation.get("reasons") or [])) + "</p>")
        holdout, answers = evaluation.get("holdout") or {}, evaluation.get("answers") or {}
        rows = []
        for label, key, fmt in (("holdout loss", "loss", "{:.4f}"), ("holdout perplexity", "perplexity", "{:.2f}")):
            base, tuned = _num(holdout.get(f"{key}_base")), _num(holdout.get(f"{key}_adapter"))
            rows.append((label, base, tuned, fmt, "lower is better"))
        for label, key in (("ROUGE-L vs reference", "rouge_l"), ("similarity vs reference", "similarity")):
            rows.append((label, _num(answers.get(f"{key}_base")), _num(answers.get(f"{key}_adapter")), "{:.4f}",
                         "higher is better"))
        table = "".join(
            f"<tr><td>{_e(label)}<span class=sub>{_e(better)}</span></td>"
            f'<td class="num">{_e(fmt.format(b) if b is not None else "–")}</td>'
            f'<td class="num">{_e(fmt.format(t) if t is not None else "–")}</td>'
            f'<td class="num">{_e(f"{t - b:+.4f}" if b is not None and t is not None else "–")}</td></tr>'
            for label, b, t, fmt, better in rows if b is not None or t is not None)
        if table:
            body.append('<table class="compact"><thead><tr><th>offline metric</th><th class=num>base</th>'
                        "<th class=num>adapter</th>"
                        f"<th class=num>change</th></tr></thead><tbody>{table}</tbody></table>")
        facts = [("loss improvement", _pct(holdout.get("loss_improvement"), 2)),
                 ("required", _pct((evaluation.get("thresholds") or {}).get("min_loss_improvement"), 2)),
                 ("holdout rows", holdout.get("n")), ("answers compared", answers.get("n"))]
        body.append('<p class="lead" style="margin-top:10px">' + " · ".join(
            f"{_e(k)} {_e(v)}" for k, v in facts if v not in (None, "–")) + "</p>")
    train_facts = [("train rows", train.get("train_rows")), ("holdout rows", train.get("holdout_rows")),
                   ("final train loss", _fixed(train.get("train_loss_final"))),
                   ("train tokens", train.get("train_tokens")), ("wall time", _seconds(train.get("wall_time_s")))]
    shown = [(k, v) for k, v in train_facts if v not in (None, "")]
    if shown:
        body.append("<h3>Training</h3><p class=lead>" + " · ".join(f"{_e(k)} {_e(v)}" for k, v in shown) + "</p>")
    return _card("Offline gate", lead, "".join(body), anchor="offline")


def _seconds(value: Any) -> str | None:
    v = _num(value)
    return None if v is None else f"{v:,.0f} s"


def _footer(bundle: dict[str, Any]) -> str:
    analysis = bundle.get("analysis") or {}
    method = (analysis.get("sequential") or {}).get("method")
    notes = [*METHOD_NOTES, *([f"Interval method: {method}."] if method else [])]
    return _notes_footer(notes, f"Generated {_when(bundle.get('generated_at'))} by abloop · analysis evaluated "
                                f"{_when(analysis.get('evaluated_at'))}")
