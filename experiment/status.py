"""What `abloop status` and `abloop evaluate` show: an experiment, its phase, rollout step and transitions."""

from __future__ import annotations

import functools
from typing import Any

from experiment.metrics import ARMS, DEFAULT_PRIMARY, METRICS
from experiment.phases import phases_of
from store.db import Database
from store.events import count_events, count_feedback
from store.experiments import get, get_running, list_events
from store.logs import RedactFilter
from store.models import Experiment


def arms_of(experiment: Experiment) -> dict[str, dict[str, Any] | None]:
    """The experiment's two arms as {base_url, model, adapter_id, prompt_template_id}, for display (status and
    reports): a password in a base_url is shown as ***. None for an arm that is not configured. Control always
    renders with the active template (prompt_template_id None)."""

    def arm(base_url: str | None, model: str | None, adapter_id: str | None,
            prompt_template_id: str | None = None) -> dict[str, Any] | None:
        return None if not base_url else {"base_url": _shown_url(base_url), "model": model,
                                          "adapter_id": adapter_id, "prompt_template_id": prompt_template_id}

    return {"control": arm(experiment.control_base_url, experiment.control_model, experiment.control_adapter_id),
            "candidate": arm(experiment.candidate_base_url, experiment.candidate_model,
                             experiment.candidate_adapter_id, experiment.candidate_prompt_template_id)}


def arm_label(described: dict[str, Any] | None, arm: str) -> str:
    """How an arm is named to an operator: its model, and its prompt template when it has its own
    (a prompt experiment runs the same model on both arms)."""
    if not described:
        return "no candidate" if arm == "candidate" else "(model not named)"
    name = described.get("model") or "(model not named)"
    template = described.get("prompt_template_id")
    return f"{name} with prompt template {template[:8]}" if template else name


def _shown_url(url: str) -> str:
    return _url_redaction().redact(url)


@functools.cache
def _url_redaction() -> RedactFilter:
    # The logs' rule for a URL's password (built once: it compiles a pattern).
    return RedactFilter()


def describe(db: Database, experiment_id: str | None = None) -> dict[str, Any]:
    """The experiment (default: the running one) with its phases and every recorded transition."""
    experiment: Experiment | None = get(db, experiment_id) if experiment_id else get_running(db)
    status: dict[str, Any] = {
        "database": db.engine.url.render_as_string(hide_password=True),
        "search_events": count_events(db),
        "feedback": count_feedback(db),
        "experiment": None,
    }
    if experiment is None:
        return status
    events = list_events(db, experiment.id)
    phases = phases_of(experiment, events)
    status["experiment"] = {
        "id": experiment.id,
        "status": experiment.status,
        **arms_of(experiment),
        "candidate_share": experiment.candidate_share,
        "primary_metric": experiment.primary_metric or DEFAULT_PRIMARY,
        "started_at": experiment.started_at.isoformat(),
        "ended_at": experiment.ended_at.isoformat() if experiment.ended_at else None,
        "phase": {"index": phases[-1].index + 1, "of": len(phases), "share": phases[-1].share,
                  "since": phases[-1].start.isoformat()},
        "rollout": experiment.rollout,
        "decision": experiment.decision,
        "search_events": count_events(db, experiment.id),
        "transitions": [
            {"ts": e.ts.isoformat(), "kind": e.kind, "from_share": e.from_share, "to_share": e.to_share,
             "reason": e.reason}
            for e in events
        ],
    }
    return status


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def render(status: dict[str, Any]) -> str:
    lines = [f"database: {status['database']}  index: {status.get('index_version')}  "
             f"events: {status['search_events']}  feedback: {status['feedback']}"]
    experiment = status["experiment"]
    if experiment is None:
        return "\n".join([*lines, "no running experiment"])
    candidate = experiment["candidate"]
    lines += [
        f"experiment {experiment['id']} ({experiment['status']}), primary metric {experiment['primary_metric']}",
        f"  control:   {arm_label(experiment['control'], 'control')} @ {experiment['control']['base_url']}",
        f"  candidate: {arm_label(candidate, 'candidate')} @ {candidate['base_url']}" if candidate
        else "  candidate: none",
        f"  share {_share(experiment['candidate_share'])}, phase {experiment['phase']['index']} of "
        f"{experiment['phase']['of']} since {experiment['phase']['since']}",
    ]
    rollout = experiment["rollout"]
    if rollout:
        steps = " -> ".join(_share(s) for s in rollout["steps"])
        lines.append(f"  rollout {steps}: step {rollout['step'] + 1} of {len(rollout['steps'])} (min "
                     f"{rollout['min_users_per_step']} users and {rollout['min_hours_per_step']} h per step, "
                     f"{'auto-promote' if rollout['auto_promote'] else 'promote on approval'})")
        # Imported here: experiment.rollout imports the analysis, which a status without a plan does not need.
        from experiment.rollout import is_paused

        if is_paused(experiment["candidate_share"], rollout["steps"], rollout["step"]):
            lines.append(f"  rollout PAUSED: the share was set by hand to {_share(experiment['candidate_share'])}; "
                         "PUT a new rollout to resume")
    decision = experiment["decision"] or {}
    if decision.get("action"):
        lines.append(f"  last decision: {decision['action']} - {decision.get('reason', '')}")
    lines.append("  transitions:")
    for t in experiment["transitions"]:
        lines.append(f"    {t['ts']}  {t['kind']:<13} {_share(t['from_share']):>4} -> {_share(t['to_share']):<4} "
                     f"{t['reason']}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _chance(probability: float) -> str:
    """As GrowthBook shows it: a probability that rounds to certainty is not printed as certain."""
    shown = f"{probability:.1%}"
    return {"100.0%": ">99.9%", "0.0%": "<0.1%"}.get(shown, shown)


# The rows of `abloop evaluate`'s table after users and requests: every metric the analysis compares.
TABLE_METRICS = (*METRICS, "latency_p95_ms")


def render_analysis(analysis: dict[str, Any]) -> str:
    """A terminal table of an analysis: per-arm figures, the primary metric, guardrails and the decision."""
    if analysis["experiment_id"] is None:
        return f"decision: {analysis['decision']['action']} - {analysis['decision']['reason']}"
    primary_name = analysis["primary_metric"]
    comparisons = analysis["metrics"]
    lines = [f"experiment {analysis['experiment_id']} (candidate share {_share(analysis['candidate_share'])}, "
             f"primary metric {primary_name})",
             f"  {'':<32}{'control':>12}{'candidate':>12}  always-valid 95% interval of the difference"]
    for name in ("users", "requests", *TABLE_METRICS):
        comparison = comparisons.get(name)
        values = [comparison[arm] if comparison else analysis["arms"][arm].get(name) for arm in ARMS]
        interval = "" if not comparison else f"  [{_fmt(comparison['ci'][0])}, {_fmt(comparison['ci'][1])}]"
        label = f"{name} (primary)" if name == primary_name else name
        lines.append(f"  {label:<32}{_fmt(values[0]):>12}{_fmt(values[1]):>12}{interval}")
    primary = comparisons.get(primary_name)
    if primary:
        relative = "" if primary.get("relative") is None else f" ({primary['relative']:+.1%})"
        lines.append(f"  {primary_name}: candidate - control = {primary['difference']:+.4g}{relative}, "
                     f"always-valid p = {_fmt(primary['p_value'])}, chance to win {_chance(primary['chance_to_win'])}")
        if primary.get("cuped"):
            lines.append(f"  {primary_name}: CUPED on the users' pre-period values cut its variance by "
                         f"{primary['cuped']['variance_reduction']:.1%}")
    for phase in analysis["phases"]:
        control_users, candidate_users = phase["users"]
        lines.append(f"  phase {phase['index'] + 1}: share {_share(phase['share'])}, users {control_users} control / "
                     f"{candidate_users} candidate, sample-ratio p={_fmt(phase['p_value'])}"
                     f"{'  MISMATCH' if phase['mismatch'] else ''}")
    assignment = analysis["assignment"]
    if assignment.get("users_left_out") or assignment.get("users_in_both_arms"):
        lines.append(f"  users left out: {assignment.get('users_left_out', 0)} whose bucket a share change moved; "
                     f"users seen in both arms: {assignment.get('users_in_both_arms', 0)}")
    lines.append(f"  guardrails breached: {'; '.join(analysis['guardrails']['breached']) or 'none'}")
    lines.append(f"decision: {analysis['decision']['action']} - {analysis['decision']['reason']}")
    rollout = analysis["decision"].get("rollout")
    if rollout:
        lines.append(f"rollout: {rollout}")
    return "\n".join(lines)
