"""Automatic answer scoring for evaluate_arms: a sample of each arm's answers, graded without user feedback.

Grounding (embeddings, local) always runs; the LLM judge runs when an endpoint and model are set.
Scores are saved as they are made, and only unscored events are sampled, so a retry or the next
run picks up where this one stopped instead of paying for the same answers twice.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

if TYPE_CHECKING:
    from retrieval.grounding import GroundingScorer
    from retrieval.judge import LLMJudge
    from store.db import Database
    from store.scores import ScoringInput

log = logging.getLogger(__name__)

_JUDGE_SAVE_EVERY = 20
# An unreachable judge would otherwise cost a full timeout per event for the whole sample.
_MAX_CONSECUTIVE_JUDGE_FAILURES = 5


# NO_CACHE: the task writes to the store, and its inputs include a secret that has no place in a cache key.
@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def score_answers(
    database_url: str,
    experiment_id: str,
    per_arm: int,
    embedding_model: str,
    judge_api_base: str | None = None,
    judge_model: str | None = None,
    judge_api_key: str | None = None,
) -> dict:
    from retrieval.embedder import Embedder
    from retrieval.grounding import GroundingScorer
    from retrieval.judge import LLMJudge
    from store.db import Database

    db = Database(database_url)
    judge = LLMJudge(judge_api_base, judge_model, judge_api_key) if judge_api_base and judge_model else None
    try:
        counts = score_experiment(db, experiment_id, per_arm, GroundingScorer(Embedder(embedding_model)), judge)
    finally:
        if judge is not None:
            judge.close()
        db.dispose()
    get_run_logger().info(f"answer scores for experiment {experiment_id}: {counts}")
    return counts


def score_experiment(
    db: Database,
    experiment_id: str,
    per_arm: int,
    scorer: GroundingScorer,
    judge: LLMJudge | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Score up to `per_arm` unscored answers per assigned arm; returns how many were scored and failed.

    The same seed gives both methods the same random order, so their samples mostly coincide and
    the two scores can be compared on the same answers.
    """
    from retrieval.grounding import passages_from_messages
    from store.scores import events_to_score, save_scores

    events = events_to_score(db, experiment_id, "grounding", per_arm, seed)
    results = scorer.score_many([(e.answer, passages_from_messages(e.messages)) for e in events])
    grounded = save_scores(db, [(e.event_id, "grounding", score, detail)
                                for e, (score, detail) in zip(events, results, strict=True)])
    counts: dict[str, Any] = {"grounding": grounded, "judge": 0, "judge_failures": 0, "judge_skipped": 0}
    if judge is not None:
        counts.update(_judge_events(db, events_to_score(db, experiment_id, "judge", per_arm, seed), judge))
    return counts


def _judge_events(db: Database, events: list[ScoringInput], judge: LLMJudge) -> dict[str, int]:
    from retrieval.grounding import passages_from_messages
    from retrieval.judge import JudgeError
    from store.scores import save_scores

    scored = failures = consecutive = skipped = 0
    pending: list[tuple[str, str, float, dict[str, Any]]] = []
    for done, event in enumerate(events):
        if consecutive >= _MAX_CONSECUTIVE_JUDGE_FAILURES:
            skipped = len(events) - done
            log.warning("judge failed %d times in a row; skipping the %d events left", consecutive, skipped)
            break
        try:
            score, detail = judge.score(event.query, event.answer, passages_from_messages(event.messages))
        except JudgeError as exc:
            failures += 1
            consecutive += 1
            log.warning("judge skipped event %s: %s", event.event_id, exc)
            continue
        consecutive = 0
        pending.append((event.event_id, "judge", score, detail))
        if len(pending) >= _JUDGE_SAVE_EVERY:
            scored += save_scores(db, pending)
            pending = []
    scored += save_scores(db, pending)
    return {"judge": scored, "judge_failures": failures, "judge_skipped": skipped}
