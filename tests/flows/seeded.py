"""A store the evaluate_arms flow has something to decide on."""

from __future__ import annotations

from pathlib import Path

from store import experiments
from store.db import Database
from store.models import Experiment
from tests.experiment import traffic
from tests.experiment.traffic import ArmBehaviour


def promotable_experiment(path: Path) -> tuple[Database, Experiment]:
    """A migrated SQLite store whose running experiment has a one-step rollout and a clearly better
    candidate: the next evaluation promotes it."""
    from experiment import lifecycle

    db = Database(f"sqlite:///{path}")
    db.migrate()
    running = traffic.start(db, share=0.0)
    lifecycle.set_rollout(db, running.id, {"steps": [0.5], "min_users_per_step": 0, "min_hours_per_step": 0})
    running = experiments.get(db, running.id)
    traffic.write(db, running, users=2000, control=ArmBehaviour(up=0.45), candidate=ArmBehaviour(up=0.60))
    return db, running
