"""rollback: end an experiment as rolled back; every user is served by control (as the admin API and CLI)."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from flows.observability import observed


@task
def roll_back_experiment(database_url: str, experiment_id: str, reason: str | None) -> dict:
    from experiment import lifecycle
    from store.db import Database

    successor = lifecycle.rollback(Database(database_url), experiment_id, via="prefect", reason=reason)
    return {"rolled_back": experiment_id, "new_experiment": successor.id, "control_model": successor.control_model}


@observed
@flow(name="rollback")
def rollback(experiment_id: str, reason: str | None = None) -> dict:
    from store.config import Settings

    outcome = roll_back_experiment(Settings().database_url, experiment_id, reason)
    get_run_logger().info(f"experiment {experiment_id} rolled back; {outcome['control_model']} serves everyone")
    return outcome
