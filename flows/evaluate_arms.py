"""evaluate_arms: score a sample of answers, analyse the experiment, record the decision, act on its rollout.

Meant to run hourly: the decision uses always-valid intervals, so looking often does not inflate
false decisions. Where the experiment carries a rollout plan the same call advances it, rolls back
or promotes (experiment.rollout). Artifacts: a markdown summary and a per-arm table.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.observability import observed
from flows.parameters import AtLeastZero
from flows.scoring import score_answers


@task(retries=2, retry_delay_seconds=10)
def analyse_experiment(database_url: str, experiment_id: str | None) -> dict:
    import experiment
    from experiment.decision import Policy
    from store.config import Settings
    from store.db import Database

    return experiment.evaluate(Database(database_url), experiment_id, Policy.from_settings(Settings())).to_dict()


@task
def resolve_experiment(database_url: str, experiment_id: str | None) -> str | None:
    from store.db import Database
    from store.experiments import get_running

    if experiment_id is not None:
        return experiment_id
    running = get_running(Database(database_url))
    return None if running is None or not running.candidate_base_url else running.id


@task
def publish(database_url: str, analysis: dict) -> None:
    """The operator report's content (experiment.report) as a markdown artifact, and the per-arm table."""
    from experiment.decision import Policy
    from experiment.report import gather, to_markdown
    from store.config import Settings
    from store.db import Database

    rows = [{"arm": arm, **values} for arm, values in analysis["arms"].items()]
    create_table_artifact(rows, key="arms", description="Per assigned arm (users are the unit)")
    if analysis["experiment_id"] is None:
        markdown = f"**Decision: {analysis['decision']['action']}** - {analysis['decision']['reason']}"
    else:
        bundle = gather(Database(database_url), analysis["experiment_id"], Policy.from_settings(Settings()), points=6)
        markdown = to_markdown(bundle)
    create_markdown_artifact(markdown, key="decision")


@observed
@flow(name="evaluate_arms")
def evaluate_arms(experiment_id: str | None = None, score_sample: AtLeastZero | None = None) -> dict:
    from store.config import Settings

    settings = Settings()
    log = get_run_logger()
    target = resolve_experiment(settings.database_url, experiment_id)
    per_arm = settings.answer_score_sample if score_sample is None else score_sample
    if target is not None and per_arm > 0:
        score_answers(settings.database_url, target, per_arm, settings.embedding_model,
                      settings.judge_api_base, settings.judge_model, settings.llm_key())
    analysis = analyse_experiment(settings.database_url, experiment_id)
    publish(settings.database_url, analysis)
    log.info(f"experiment {analysis['experiment_id']}: {analysis['decision']['action']}")
    return analysis
