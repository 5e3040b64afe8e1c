"""The life cycle of an experiment: start, ramp, promote, roll back, stop.

Each operation is one transaction that changes the experiment and records the transition with its
reason in `experiment_events`, so the change and its why cannot drift apart. The admin API, the
CLI, the flows and the rollout all call these functions; nothing else changes an experiment.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from experiment.phases import phases_of
from store import prompts
from store.db import Database
from store.experiments import (
    RUNNING,
    ExperimentNotFound,
    add_event,
    events_in,
    get,
    get_running,
    lock_running,
    new_salt,
)
from store.models import Experiment, utcnow

if TYPE_CHECKING:
    from experiment.decision import Policy
    from experiment.rollout import RolloutPlan

__all__ = [
    "ExperimentNotFound",
    "ExperimentNotRunning",
    "NoPromoteDecision",
    "StaleAnalysis",
    "advance_rollout",
    "conclude",
    "promote",
    "rollback",
    "set_rollout",
    "set_share",
    "start_candidate",
    "stop",
]


class ExperimentNotRunning(RuntimeError):
    pass


class NoPromoteDecision(RuntimeError):
    pass


class StaleAnalysis(RuntimeError):
    """The analysis a change was decided on is of an earlier phase than the experiment's current one."""


def _running_by_id(session: Session, experiment_id: str, seen_phase: dict[str, Any] | None = None) -> Experiment:
    """The running experiment, held by this transaction until it commits.

    Held, not just read: of two changes that race (an operator's promote and the rollout's roll-back, two
    replicas' promotes) one wins and the other finds it ended, instead of both ending it and starting two
    successors. `seen_phase`: see `_check_phase`.
    """
    if not lock_running(session, experiment_id):
        ended = session.get(Experiment, experiment_id)
        if ended is None:
            raise ExperimentNotFound(f"unknown experiment {experiment_id!r}")
        raise ExperimentNotRunning(f"experiment {experiment_id} is {ended.status}, not running")
    experiment = session.get(Experiment, experiment_id)
    if seen_phase is not None:
        _check_phase(session, experiment, seen_phase)
    return experiment


def _check_phase(session: Session, experiment: Experiment, seen: dict[str, Any]) -> None:
    """Refuse a change decided on an analysis whose last phase (`Analysis.phases[-1]`) is no longer the current one.

    Evaluations overlap (the hourly flow and `abloop evaluate`, a retried run): one that analysed the 5% step
    while another moved the rollout on to 25% would otherwise step again, or promote, on the 5% step's numbers.
    Checked while the experiment is held, so no step can come between the check and the change.
    """
    now = phases_of(experiment, events_in(session, experiment.id))[-1]
    if (now.start, now.share) != (datetime.fromisoformat(seen["start"]), seen["share"]):
        raise StaleAnalysis(f"it ends in the phase at {seen['share']:.0%} from {seen['start']}, but experiment "
                            f"{experiment.id} has been at {now.share:.0%} since {now.start.isoformat()}")


def _plan(rollout: dict[str, Any] | None) -> RolloutPlan:
    from experiment.rollout import RolloutPlan  # imported here: experiment.rollout imports this module

    return RolloutPlan.from_dict(rollout or {})


def _change_share(session: Session, experiment: Experiment, share: float, *, reason: str, kind: str,
                  analysis: dict[str, Any] | None) -> None:
    """A new share and its transition; the same share again records nothing (it starts no phase)."""
    if experiment.candidate_share != share:
        add_event(session, experiment, kind, from_share=experiment.candidate_share, to_share=share,
                  reason=reason, analysis=analysis)
        experiment.candidate_share = share


def set_share(db: Database, experiment_id: str, share: float, *,
              reason: str = "share changed by an operator") -> Experiment:
    """Change the split in place: same salt, so users only move in the direction of the change.

    A change starts a new phase (the sample-ratio check runs per phase); setting the same share
    again records nothing.
    """
    with db.session() as session:
        experiment = _running_by_id(session, experiment_id)
        _change_share(session, experiment, share, reason=reason, kind="share", analysis=None)
        return experiment


def set_rollout(db: Database, experiment_id: str, plan: dict[str, Any], *,
                reason: str = "rollout started") -> Experiment:
    """Attach a progressive rollout (see `experiment.rollout.RolloutPlan`) and move to its first step."""
    checked = _plan(plan)
    with db.session() as session:
        experiment = _running_by_id(session, experiment_id)
        if not experiment.candidate_base_url:
            raise ExperimentNotRunning(f"experiment {experiment_id} has no candidate to roll out")
        first = checked.steps[0]
        add_event(session, experiment, "rollout_step", from_share=experiment.candidate_share, to_share=first,
                  reason=f"{reason}: step 1 of {len(checked.steps)} ({first:.0%})")
        experiment.rollout = checked.to_dict(step=0)
        experiment.candidate_share = first
        return experiment


def advance_rollout(db: Database, experiment_id: str, step: int, *, reason: str, analysis: dict[str, Any],
                    seen_phase: dict[str, Any]) -> Experiment:
    """Move the rollout to `step` of its plan: the share and the plan's step change in one transaction.

    `seen_phase`: the last phase of the analysis behind the step; StaleAnalysis if the experiment has moved on
    since (another evaluation stepped it, an operator set the share).
    """
    with db.session() as session:
        experiment = _running_by_id(session, experiment_id, seen_phase)
        plan = _plan(experiment.rollout)
        _change_share(session, experiment, plan.steps[step], reason=reason, kind="rollout_step", analysis=analysis)
        experiment.rollout = plan.to_dict(step=step)
        return experiment


def start_candidate(
    db: Database,
    *,
    base_url: str,
    model: str,
    adapter_id: str | None = None,
    share: float | None = None,
    primary_metric: str | None = None,
    reason: str = "new candidate",
    prompt_template_id: str | None = None,
) -> Experiment:
    """A new candidate is a new experiment (new id, new salt); the control arm carries over.

    Without a `share` it starts at the running experiment's, or, where that one was rolling out, at its
    plan's first step with the plan carried over (see `_carried_over`).
    With `prompt_template_id` the candidate renders its prompts with that template version
    (control keeps the active one): the same model with another prompt is a candidate too.
    """
    current = get_running(db)
    if current is None:
        raise ExperimentNotFound("no running experiment")
    with db.session() as session:
        old = _running_by_id(session, current.id)
        _end(session, old, "stopped", {"reason": "replaced by a new candidate"})
        start_share, rollout, rolling = _carried_over(old, share)
        fresh = Experiment(
            control_base_url=old.control_base_url,
            control_model=old.control_model,
            control_adapter_id=old.control_adapter_id,
            candidate_base_url=base_url,
            candidate_model=model,
            candidate_adapter_id=adapter_id,
            candidate_prompt_template_id=prompt_template_id,
            candidate_share=start_share,
            rollout=rollout,
            salt=new_salt(),
            status=RUNNING,
            primary_metric=primary_metric,
        )
        session.add(fresh)
        session.flush()
        prompt = f" with prompt template {prompt_template_id}" if prompt_template_id else ""
        add_event(session, fresh, "start", to_share=fresh.candidate_share,
                  reason=f"{reason}: {model}{prompt}{rolling}")
    return fresh


def _carried_over(old: Experiment, share: float | None) -> tuple[float, dict[str, Any] | None, str]:
    """A new candidate's share, rollout plan, and what its start says of them; `share`: the one asked for, if any.

    Mid-rollout, the old candidate's ramped share is no share for an untested model: it starts the plan over
    at step 1, with the plan's checks (and automatic roll-back) from the first step on.
    """
    if share is not None or not old.rollout:
        return (old.candidate_share if share is None else share), None, ""
    plan = _plan(old.rollout)
    first = plan.steps[0]
    return first, plan.to_dict(step=0), f"; rollout carried over: step 1 of {len(plan.steps)} ({first:.0%})"


def _end(session: Session, experiment: Experiment, outcome: str, decision: dict[str, Any]) -> None:
    analysis = decision.pop("analysis", None)  # kept once, on the transition, not again on the row
    experiment.status = outcome
    experiment.ended_at = utcnow()
    experiment.decision = decision
    add_event(session, experiment, outcome, from_share=experiment.candidate_share, to_share=0.0,
              reason=str(decision.get("reason") or outcome), analysis=analysis)


def conclude(
    db: Database, experiment_id: str, *, outcome: str, decision: dict[str, Any] | None = None,
    seen_phase: dict[str, Any] | None = None,
) -> Experiment:
    """End a running experiment as `promoted`, `rolled_back` or `stopped` and start its successor.

    Promoted: the candidate becomes control. Otherwise control stays. Either way the successor
    has no candidate and a share of 0, so every user is served by the winner. `seen_phase`: the last
    phase of the analysis behind it, which must still be the current one (StaleAnalysis).
    """
    if outcome not in ("promoted", "rolled_back", "stopped"):
        raise ValueError(f"unknown outcome {outcome!r}")
    with db.session() as session:
        old = _running_by_id(session, experiment_id, seen_phase)
        if outcome == "promoted" and not old.candidate_base_url:
            raise ExperimentNotRunning(f"experiment {experiment_id} has no candidate to promote")
        _end(session, old, outcome, dict(decision or {}))
        if outcome == "promoted":
            control = (old.candidate_base_url, old.candidate_model, old.candidate_adapter_id)
            if old.candidate_prompt_template_id:
                # Control renders with the active version, so the winning prompt becomes active.
                prompts.activate_in(session, old.candidate_prompt_template_id)
        else:
            control = (old.control_base_url, old.control_model, old.control_adapter_id)
        fresh = Experiment(
            control_base_url=control[0],
            control_model=control[1],
            control_adapter_id=control[2],
            candidate_share=0.0,
            salt=new_salt(),
            status=RUNNING,
        )
        session.add(fresh)
        session.flush()
        add_event(session, fresh, "start", to_share=0.0, reason=f"successor of {old.id} ({outcome})")
    return fresh


def promote(db: Database, experiment_id: str, *, force: bool = False, via: str, reason: str | None = None,
            policy: Policy | None = None, current: dict[str, Any] | None = None,
            seen_phase: dict[str, Any] | None = None) -> Experiment:
    """Candidate becomes control, share back to 0; returns the successor experiment.

    Without `force` the experiment must carry a recorded "promote" decision (written by
    `abloop evaluate` or the evaluate_arms flow): a promotion is backed by numbers or by an
    operator who said so. And the numbers must still say so: the experiment is analysed again
    (with `policy`; `current`: a decision made moments ago, by the rollout) and a decision that no
    longer holds (traffic since, a share change) is refused with what the analysis says now.
    `seen_phase`: with `current`, the last phase of its analysis, which must still be the current one.
    """
    experiment = get(db, experiment_id)
    recorded = (experiment.decision or {}).get("action")
    if not force and recorded != "promote":
        raise NoPromoteDecision(
            f"experiment {experiment_id} has no recorded promote decision (recorded: {recorded!r}); "
            "run `abloop evaluate` first or force it"
        )
    if not force:
        from experiment.analysis import analyse

        now = current or analyse(db, experiment_id, policy).decision
        if now["action"] != "promote":
            raise NoPromoteDecision(
                f"experiment {experiment_id}: its recorded promote decision no longer holds; the analysis now "
                f"says {now['action']}: {now['reason']}; run `abloop evaluate` again or force it"
            )
    default = "forced by an operator" if force and recorded != "promote" else f"promoted via {via}"
    decision = dict(experiment.decision or {}, forced=force, via=via, reason=reason or default)
    return conclude(db, experiment_id, outcome="promoted", decision=decision, seen_phase=seen_phase)


def rollback(db: Database, experiment_id: str, *, via: str, reason: str | None = None,
             analysis: dict[str, Any] | None = None) -> Experiment:
    """End the experiment as rolled_back: every user is served by control from the next refresh on.

    Needs no recorded decision: taking traffic off a candidate is always allowed.
    """
    experiment = get(db, experiment_id)
    decision = dict(experiment.decision or {}, via=via, reason=reason or f"rolled back via {via}")
    if analysis is not None:
        decision["analysis"] = analysis
    return conclude(db, experiment_id, outcome="rolled_back", decision=decision)


def stop(db: Database, experiment_id: str, *, via: str, reason: str | None = None) -> Experiment:
    """End the experiment without a winner; control keeps serving."""
    experiment = get(db, experiment_id)
    decision = dict(experiment.decision or {}, via=via, reason=reason or f"stopped via {via}")
    return conclude(db, experiment_id, outcome="stopped", decision=decision)
