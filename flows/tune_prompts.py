"""tune_prompts: rules proposed from recent corrections, then a new version of each active prompt template.

Meant to run nightly. Proposed rules wait for an operator (`/api/v1/rules`); rules approved by then
go into the new versions: instructions into the system prompt, output rules as data the proxy
applies. Few-shot examples come from the window's best-rated answers (training.tuning). A version
is written only when something changed. Artifact: a markdown summary of what was done.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import cache

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.observability import observed
from flows.parameters import AtLeastOne, Cosine, Rating


@cache
def _encoder(model: str):
    """One sentence embedder per process, shared by every template's task."""
    from retrieval.embedder import Embedder

    return Embedder(model)


@task(retries=2, retry_delay_seconds=10)
def propose_rules(database_url: str, days: int, min_support: int, dry_run: bool) -> dict:
    from store import rules
    from store.db import Database
    from training.rules import propose_rules as derive

    db = Database(database_url)
    proposals = derive(rules.corrections(db, since=datetime.now(UTC) - timedelta(days=days)), min_support)
    stored = {} if dry_run else rules.propose(db, [(p.kind, p.text, p.feedback_ids) for p in proposals])
    return {"proposals": [p.to_dict() for p in proposals], "stored": stored}


@task(retries=2, retry_delay_seconds=10)
def find_active_templates(database_url: str) -> list[str]:
    from store import prompts
    from store.db import Database

    return [template.id for template in prompts.list_versions(Database(database_url), active_only=True)]


@task(retries=2, retry_delay_seconds=10)
def tune_template(database_url: str, template_id: str, embedding_model: str, days: int, min_rating: int,
                  max_examples: int, similarity: float, dry_run: bool, activate: bool) -> dict:
    from store import prompts
    from store.db import Database
    from training.tuning import tune

    db = Database(database_url)
    result = tune(db, prompts.get(db, template_id), days=days, min_rating=min_rating, max_examples=max_examples,
                  dry_run=dry_run, activate=activate, encoder=_encoder(embedding_model), threshold=similarity)
    return result.to_dict()


@task
def publish(rules: dict, results: list[dict], dry_run: bool) -> str:
    lines = [f"# Prompt tuning{' (dry run: nothing written)' if dry_run else ''}", "",
             "| template | from | to | candidates | duplicates | selected (simulated) | rules applied |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        counts = r["counts"]
        lines.append(f"| {r['name']} | v{r['base_version']} | {_outcome(r)} | {counts['candidates']} | "
                     f"{counts['duplicates']} | {counts['selected']} ({counts['simulated_selected']}) | "
                     f"{len(r['rules_applied'])} |")
    proposals = rules["proposals"]
    lines += ["", f"## Rules proposed from corrections: {len(proposals)}", ""]
    lines += [f"- `{p['kind']}` {p['text']!r}: {p['support']} corrections ({p['simulated']} from simulated users)"
              for p in proposals]
    if rules["stored"]:
        lines += ["", f"Stored: {rules['stored']}; they wait for an operator at `/api/v1/rules?status=proposed`."]
    markdown = "\n".join(lines)
    create_markdown_artifact(markdown, key="tune-prompts", description="Prompt template versions and rules")
    return markdown


def _outcome(result: dict) -> str:
    if result["new_version"] is not None:
        return f"v{result['new_version']}" + ("" if result["activated"] else " (inactive)")
    return "would change" if result["changed"] else "unchanged"


@observed
@flow(name="tune_prompts")
def tune_prompts(
    days: AtLeastOne = 7,
    min_rating: Rating = 4,
    max_examples: AtLeastOne = 5,
    dry_run: bool = False,
    similarity: Cosine = 0.9,
    min_support: AtLeastOne = 2,
    activate: bool = True,
) -> dict:
    """`similarity`: cosine at which two questions are near-duplicates; `min_support`: corrections a
    rule needs; `activate=False` writes the versions inactive, to try them as a candidate arm first."""
    from store.config import Settings

    settings = Settings()
    log = get_run_logger()
    rules = propose_rules(settings.database_url, days, min_support, dry_run)
    log.info(f"{len(rules['proposals'])} rules proposed from corrections: {rules['stored']}")
    results = [tune_template(settings.database_url, template_id, settings.embedding_model, days, min_rating,
                             max_examples, similarity, dry_run, activate)
               for template_id in find_active_templates(settings.database_url)]
    for r in results:
        log.info(f"{r['name']} v{r['base_version']}: {r['counts']['selected']} new examples, "
                 f"new version {r['new_version'] or 'none'}")
    publish(rules, results, dry_run)
    return {"rules": rules, "templates": results}
