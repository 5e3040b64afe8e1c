"""Reading the store into the report's JSON-ready bundle.

The experiment to report on, its analysis and timeline, its transitions, example answers of both arms, the
candidate adapter's offline gate and how much of the traffic was simulated. numpy and scipy (the analysis)
load only when `gather` runs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from experiment.decision import Policy
from experiment.metrics import ARMS
from experiment.report.content import _truncate
from store.db import Database
from store.experiments import RUNNING, get, get_running, list_events, list_experiments
from store.models import Adapter, Experiment, Feedback, SearchEvent, utcnow

# The demo's simulator labels its users so (training.dataset.SIMULATED_USER_PREFIX; `experiment` may not import it).
SIMULATED_PREFIX = "sim-"
EXAMPLES = 4


def gather(db: Database, experiment_id: str | None = None, policy: Policy | None = None,
           points: int = 12) -> dict[str, Any]:
    """Everything the report shows, JSON-ready. Default experiment: see `_choose`."""
    from experiment.analysis import analyse, empty, timeline  # numpy and scipy: only when gathering

    policy = policy or Policy()
    experiment, selection = _choose(db, experiment_id)
    bundle: dict[str, Any] = {"generated_at": utcnow().isoformat(), "selection": selection, "experiment": None,
                              "analysis": None, "timeline": [], "transitions": [], "examples": None,
                              "offline_gate": None, "simulated": None}
    if experiment is None:
        bundle["analysis"] = empty(selection, policy).to_dict()
        return bundle
    bundle["experiment"] = _describe(experiment)
    bundle["analysis"] = analyse(db, experiment.id, policy).to_dict()
    if experiment.candidate_base_url:  # without a candidate there is no comparison to draw
        bundle["timeline"] = timeline(db, experiment.id, policy, points)
    bundle["transitions"] = _transitions(db, experiment.id)
    bundle["simulated"] = _simulated(db, experiment.id)
    bundle["examples"] = _examples(db, experiment.id)
    bundle["offline_gate"] = _offline_gate(db, experiment.candidate_adapter_id)
    return bundle


def _choose(db: Database, experiment_id: str | None) -> tuple[Experiment | None, str]:
    """The experiment to report on, and why that one.

    Right after a promotion the running experiment has no candidate; the report is then about the
    last real comparison: the most recently ended experiment that had a candidate.
    """
    if experiment_id is not None:
        return get(db, experiment_id), "the experiment asked for"
    running = get_running(db)
    if running is not None and running.candidate_base_url:
        return running, "the running experiment"
    for candidate in list_experiments(db, limit=100):
        if candidate.status != RUNNING and candidate.candidate_base_url:
            why = "the running experiment has no candidate" if running else "no experiment is running"
            return candidate, f"the last ended experiment that compared two arms ({why})"
    if running is not None:
        return running, "the running experiment (it has no candidate arm)"
    return None, "no experiment in the store"


def _describe(experiment: Experiment) -> dict[str, Any]:
    from experiment.status import arms_of

    return {
        "id": experiment.id,
        "status": experiment.status,
        **arms_of(experiment),
        "candidate_share": experiment.candidate_share,
        "primary_metric": experiment.primary_metric,
        "started_at": _iso(experiment.started_at),
        "ended_at": _iso(experiment.ended_at),
        "rollout": experiment.rollout,
        "recorded_decision": experiment.decision,
    }


def _transitions(db: Database, experiment_id: str) -> list[dict[str, Any]]:
    """Every recorded transition, with the users seen by then (to place it on the users axis of the charts)."""
    rows = []
    with db.session() as session:
        for event in list_events(db, experiment_id):
            users = session.scalar(
                select(func.count(func.distinct(SearchEvent.user_id)))
                .where(SearchEvent.experiment_id == experiment_id, SearchEvent.user_id.is_not(None),
                       SearchEvent.arm.in_(ARMS), SearchEvent.ts <= event.ts)
            )
            rows.append({"ts": _iso(event.ts), "kind": event.kind, "from_share": event.from_share,
                         "to_share": event.to_share, "reason": event.reason, "users": int(users or 0)})
    return rows


def _simulated(db: Database, experiment_id: str) -> dict[str, Any]:
    simulated = SearchEvent.user_id.like(f"{SIMULATED_PREFIX}%")
    mine = SearchEvent.experiment_id == experiment_id
    with db.session() as session:
        events = session.scalar(select(func.count()).select_from(SearchEvent).where(mine)) or 0
        sim_events = session.scalar(select(func.count()).select_from(SearchEvent).where(mine, simulated)) or 0
        sim_users = session.scalar(select(func.count(func.distinct(SearchEvent.user_id))).where(mine, simulated)) or 0
        feedback = session.scalar(select(func.count()).select_from(Feedback)
                                  .join(SearchEvent, SearchEvent.id == Feedback.event_id).where(mine)) or 0
        sim_feedback = session.scalar(select(func.count()).select_from(Feedback)
                                      .join(SearchEvent, SearchEvent.id == Feedback.event_id)
                                      .where(mine, simulated)) or 0
    return {"events": events, "simulated_events": sim_events, "simulated_users": sim_users, "feedback": feedback,
            "simulated_feedback": sim_feedback, "any": sim_events > 0, "all": events > 0 and sim_events == events}


def _examples(db: Database, experiment_id: str) -> dict[str, Any]:
    """Up to `EXAMPLES` queries answered by both arms, newest first; else the latest answer of each arm."""
    answered = (SearchEvent.experiment_id == experiment_id, SearchEvent.status != "error",
                SearchEvent.answer.is_not(None), SearchEvent.answer != "", SearchEvent.served_arm.in_(ARMS))
    with db.session() as session:
        queries = session.scalars(
            select(SearchEvent.query).where(*answered).group_by(SearchEvent.query)
            .having(func.count(func.distinct(SearchEvent.served_arm)) == len(ARMS))
            .order_by(func.max(SearchEvent.ts).desc()).limit(EXAMPLES)
        ).all()
        mode = "pairs" if queries else "latest"
        rows = []
        for query in queries or [None]:
            row: dict[str, Any] = {"query": query, "arms": {}}
            for arm in ARMS:
                chosen = select(SearchEvent).where(*answered, SearchEvent.served_arm == arm)
                if query is not None:
                    chosen = chosen.where(SearchEvent.query == query)
                event = session.scalars(chosen.order_by(SearchEvent.ts.desc(), SearchEvent.id).limit(1)).first()
                row["arms"][arm] = None if event is None else _answer(session, event)
            if any(row["arms"].values()):
                rows.append(row)
    return {"mode": mode, "rows": rows}


def _answer(session: Any, event: SearchEvent) -> dict[str, Any]:
    feedback = session.scalars(select(Feedback).where(Feedback.event_id == event.id).order_by(Feedback.ts)).all()
    return {
        "event_id": event.id, "ts": _iso(event.ts), "query": event.query, "model": event.model,
        "assigned_arm": event.arm, "status": event.status, "answer": _truncate(event.answer or ""),
        "simulated": (event.user_id or "").startswith(SIMULATED_PREFIX),
        "feedback": [{"thumbs": f.thumbs, "rating": f.rating,
                      "corrected_answer": _truncate(f.corrected_answer) if f.corrected_answer else None,
                      "comment": _truncate(f.comment) if f.comment else None} for f in feedback],
    }


def _offline_gate(db: Database, adapter_id: str | None) -> dict[str, Any] | None:
    if not adapter_id:
        return None
    with db.session() as session:
        adapter = session.get(Adapter, adapter_id)
        if adapter is None:
            return {"adapter_id": adapter_id, "missing": True}
        return {"adapter_id": adapter.id, "name": adapter.name, "base_model": adapter.base_model,
                "dataset_hash": adapter.dataset_hash, "created_at": _iso(adapter.created_at),
                "train_metrics": adapter.train_metrics, "eval_metrics": adapter.eval_metrics}


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
