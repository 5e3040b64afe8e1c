"""Progressive rollout: ramp the candidate's share through steps while the analysis says it is safe.

Like Argo Rollouts' canary steps with an analysis run between them (Kayenta's judge): each
evaluation records its decision, and where the experiment carries a plan it also acts:
- a guardrail breach or a significant loss rolls back at once;
- a step advances once it has its minimum users and hours and the analysis is clean
  (minimum sample reached, no breach, no sample-ratio mismatch);
- at the last step a promote verdict promotes, unless the plan asks for an operator's approval;
- a share set by hand (not the current step's) pauses it: no step and no promotion until a new rollout is put.
Every action is a transition in `experiment_events` with its reason and the analysis behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from experiment import lifecycle
from experiment.analysis import Analysis, analyse
from experiment.decision import KEEP_RUNNING, PROMOTE, ROLL_BACK, Policy
from store.db import Database
from store.experiments import RUNNING, get
from store.models import Experiment, utcnow


@dataclass(frozen=True)
class RolloutPlan:
    steps: tuple[float, ...]
    min_users_per_step: int = 100
    min_hours_per_step: float = 1.0
    auto_promote: bool = True

    @classmethod
    def from_dict(cls, plan: dict[str, Any]) -> RolloutPlan:
        steps = tuple(float(s) for s in plan.get("steps") or ())
        if not steps:
            raise ValueError("rollout.steps: give at least one share")
        if any(not 0 < s <= 1 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError("rollout.steps: shares must rise strictly, each in (0, 1]")
        checked = cls(steps=steps, min_users_per_step=int(plan.get("min_users_per_step", cls.min_users_per_step)),
                      min_hours_per_step=float(plan.get("min_hours_per_step", cls.min_hours_per_step)),
                      auto_promote=bool(plan.get("auto_promote", cls.auto_promote)))
        if checked.min_users_per_step < 0 or checked.min_hours_per_step < 0:
            raise ValueError("rollout.min_users_per_step and min_hours_per_step must be >= 0")
        return checked

    def to_dict(self, step: int) -> dict[str, Any]:
        return {"steps": list(self.steps), "min_users_per_step": self.min_users_per_step,
                "min_hours_per_step": self.min_hours_per_step, "auto_promote": self.auto_promote, "step": step}


def evaluate(db: Database, experiment_id: str | None = None, policy: Policy | None = None) -> Analysis:
    """Analyse an experiment (default: the running one), record its decision, and apply its rollout plan."""
    analysis = analyse(db, experiment_id, policy)
    if analysis.experiment_id is None:
        return analysis
    record_decision(db, analysis)
    experiment = get(db, analysis.experiment_id)
    if experiment.status == RUNNING and experiment.rollout:
        analysis.decision["rollout"] = act(db, experiment, analysis)
    return analysis


def record_decision(db: Database, analysis: Analysis) -> None:
    """Write the decision on the experiment, where `promote` (API or CLI) looks for it."""
    with db.session() as session:
        experiment = session.get(Experiment, analysis.experiment_id)
        if experiment is not None and experiment.status == RUNNING:
            experiment.decision = dict(analysis.decision, evaluated_at=analysis.evaluated_at)


def act(db: Database, experiment: Experiment, analysis: Analysis) -> dict[str, Any]:
    """One rollout step decision; returns what was done, for the analysis output.

    A roll-back needs no more than the verdict (taking traffic off a candidate is always allowed, and a breach
    stays in the data). A step or a promotion is made only on an analysis of the current phase: evaluations
    overlap, and one must not step again on the numbers another has already stepped on.
    """
    plan = RolloutPlan.from_dict(experiment.rollout or {})
    step = int((experiment.rollout or {}).get("step", 0))
    try:
        return _apply(db, experiment, plan, step, analysis)
    except lifecycle.StaleAnalysis as error:
        return {"did": "stale", "step": step, "reason": f"stale analysis: {error}; the next evaluation decides"}
    except lifecycle.NoPromoteDecision as error:  # an overlapping evaluation recorded another verdict meanwhile
        return {"did": "stale", "step": step, "reason": f"{error}; the next evaluation decides"}
    except lifecycle.ExperimentNotRunning as error:  # ended meanwhile: by an overlapping evaluation, an operator
        return {"did": "ended", "step": step, "reason": str(error)}


def _apply(db: Database, experiment: Experiment, plan: RolloutPlan, step: int, analysis: Analysis) -> dict[str, Any]:
    action, reason = analysis.decision["action"], analysis.decision["reason"]
    snapshot = _brief(analysis)
    if action == ROLL_BACK:
        successor = lifecycle.rollback(db, experiment.id, via="rollout", reason=f"automatic: {reason}",
                                       analysis=snapshot)
        return {"did": "rolled_back", "step": step, "successor": successor.id}
    if is_paused(experiment.candidate_share, plan.steps, step):
        return _paused(experiment.candidate_share, plan, step)
    users, hours = _step_progress(analysis)
    ready = users >= plan.min_users_per_step and hours >= plan.min_hours_per_step
    waiting = {"did": "wait", "step": step, "step_users": users, "step_hours": round(hours, 3)}
    # A broken split says nothing about safety: with no breach it is `keep_running`, which is no reason to advance.
    if not ready or action not in (KEEP_RUNNING, PROMOTE) or analysis.srm["mismatch"]:
        return waiting
    seen_phase = analysis.phases[-1]
    if step + 1 < len(plan.steps):
        to_share = plan.steps[step + 1]
        why = (f"step {step + 2} of {len(plan.steps)} ({to_share:.0%}): step {step + 1} had {users} users over "
               f"{hours:.2f} h with no guardrail breach ({action}: {reason})")
        lifecycle.advance_rollout(db, experiment.id, step + 1, reason=why, analysis=snapshot, seen_phase=seen_phase)
        return {"did": "advanced", "step": step + 1, "share": to_share}
    if action == PROMOTE and plan.auto_promote:
        successor = lifecycle.promote(db, experiment.id, via="rollout", reason=f"automatic: {reason}",
                                      current=analysis.decision, seen_phase=seen_phase)
        return {"did": "promoted", "step": step, "successor": successor.id}
    if action == PROMOTE:
        return dict(waiting, did="awaiting_approval")
    return waiting


def is_paused(share: float, steps: list[float], step: int) -> bool:
    """Whether an experiment's share is not its rollout's current step: set by hand."""
    return share != steps[step]


def _paused(share: float, plan: RolloutPlan, step: int) -> dict[str, Any]:
    """An operator set the share by hand mid-rollout: the next step would undo that, so the rollout holds until
    they start it again (a new rollout); a roll-back on a breach still happens."""
    return {"did": "paused", "step": step, "share": share,
            "reason": (f"rollout paused: the share was changed by hand to {share:.0%} while step {step + 1} of "
                       f"{len(plan.steps)} is {plan.steps[step]:.0%}; PUT a new rollout to resume")}


def _step_progress(analysis: Analysis) -> tuple[int, float]:
    """Users active in the current step (its phase: an experiment has at least one), returning ones included, and
    hours since it began."""
    current = analysis.phases[-1]
    started = datetime.fromisoformat(current["start"])
    return current["active_users"], (utcnow() - started) / timedelta(hours=1)


def _brief(analysis: Analysis) -> dict[str, Any]:
    """What a transition keeps of the analysis: enough to explain it later, not every figure."""
    full = analysis.to_dict()
    return {key: full[key] for key in ("experiment_id", "evaluated_at", "decision", "primary", "guardrails", "srm",
                                        "arms")}
