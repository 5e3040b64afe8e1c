"""The experiment engine: assignment and phases, metrics, analysis, decision, rollout, life cycle.

`experiment.analyse(db, experiment_id)` returns the analysis whose `to_dict()` is what
`abloop evaluate --json` prints. Importing this package is cheap: numpy and scipy load only when
an analysis runs, and nothing here pulls in torch, faiss or FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from experiment.analysis import Analysis
    from experiment.decision import Policy
    from store.db import Database

__all__ = ["analyse", "evaluate"]


def analyse(db: Database, experiment_id: str | None = None, policy: Policy | None = None) -> Analysis:
    """Analyse an experiment (default: the running one) without acting on it."""
    from experiment.analysis import analyse as _analyse

    return _analyse(db, experiment_id, policy)


def evaluate(db: Database, experiment_id: str | None = None, policy: Policy | None = None) -> Analysis:
    """Analyse, record the decision, and let a configured rollout act on it (advance, promote, roll back)."""
    from experiment.rollout import evaluate as _evaluate

    return _evaluate(db, experiment_id, policy)

