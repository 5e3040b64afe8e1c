"""evaluate_arms: per-arm metrics, sample-ratio check, lift and chance to win -> a recorded decision.

The decision is written on the experiment; `promote` (API or CLI) acts on it. Artifacts: a
markdown summary and a per-arm table on the flow run.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact


@task(retries=2, retry_delay_seconds=10)
def analyse_experiment(database_url: str, experiment_id: str | None) -> dict:
    from store.arms import evaluate
    from store.db import Database

    return evaluate(Database(database_url), experiment_id).to_dict()


@task
def publish(analysis: dict) -> None:
    rows = [{"arm": arm, **values} for arm, values in analysis["arms"].items()]
    create_table_artifact(rows, key="arms", description="Per assigned arm")
    decision = analysis["decision"]
    thumbs = analysis["thumbs_up"] or {}
    create_markdown_artifact(
        "\n".join([
            f"# Experiment {analysis['experiment_id']}",
            f"**Decision: {decision['action']}** - {decision['reason']}",
            f"- sample ratio check p-value: {analysis['srm']['p_value']}",
            f"- thumbs-up lift: {thumbs.get('lift')} (CI {thumbs.get('ci')}, p={thumbs.get('p_value')}, "
            f"chance to win {thumbs.get('chance_to_win')})",
            f"- guardrails breached: {analysis['guardrails']['breached'] or 'none'}",
        ]),
        key="decision",
    )


@flow(name="evaluate_arms")
def evaluate_arms(experiment_id: str | None = None) -> dict:
    from store.config import Settings

    settings = Settings()
    log = get_run_logger()
    analysis = analyse_experiment(settings.database_url, experiment_id)
    publish(analysis)
    log.info(f"experiment {analysis['experiment_id']}: {analysis['decision']['action']}")
    return analysis
