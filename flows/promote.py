"""promote: the candidate of an experiment becomes control (the same operation as the admin API and CLI).

Without `force` the experiment must carry a recorded "promote" decision (from `evaluate_arms`) that
still holds when the experiment is analysed again now (EXPERIMENT_* settings); `reason` is what the
operator approving it wants on record (the transition keeps it).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from flows.observability import observed


@task
def promote_experiment(database_url: str, experiment_id: str, force: bool, reason: str | None) -> dict:
    from experiment import lifecycle
    from experiment.decision import Policy
    from store.config import Settings
    from store.db import Database

    successor = lifecycle.promote(Database(database_url), experiment_id, force=force, via="prefect", reason=reason,
                                  policy=Policy.from_settings(Settings()))
    return {"promoted": experiment_id, "new_experiment": successor.id, "control_model": successor.control_model}


@observed
@flow(name="promote")
def promote(experiment_id: str, force: bool = False, reason: str | None = None) -> dict:
    from store.config import Settings

    outcome = promote_experiment(Settings().database_url, experiment_id, force, reason)
    get_run_logger().info(f"experiment {experiment_id} promoted; {outcome['control_model']} now serves everyone")
    return outcome
