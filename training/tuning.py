"""Prompt tuning: few-shot examples from a template's best-rated answers, and the next version they make.

For one template (every version of its name, see `store.prompts.served_with`), over a window:

1. **Candidates**: events served with it whose feedback is positive: a rating >= `min_rating` or a
   thumbs up, and nothing negative (a thumbs down, a lower rating) and no correction: the same
   preference rule as the training dataset (training.dataset), where a corrected answer is the
   user's, not the model's. Simulated users' events count there too, so they count here, marked.
2. **Redaction** (training.redact): a few-shot example is shown to every user.
3. **Order**: best-rated first, then newest (a thumbs up counts as a 4, as in the dataset).
4. **Near-duplicates dropped**: a question whose embedding is within `threshold` cosine of a
   better candidate's or of one of the template's existing examples (training.select.greedy_dedupe).
5. **At most `max_examples`** kept.

The next version's few-shot list is the kept examples followed by the template's existing ones,
cut at `max_examples`: fresh evidence first, the oldest examples fall off. Approved rules
(store.rules) go in too: instructions appended to the system prompt, output rules stored as data.
A version is written only when something changed; it never edits the one it started from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from store import prompts, rules
from store.db import Database
from store.models import Feedback, PromptTemplate, Rule, SearchEvent
from training import Encoder
from training.dataset import SIMULATED_USER_PREFIX
from training.redact import redact_text
from training.select import greedy_dedupe

DEFAULT_THRESHOLD = 0.9
_THUMBS_UP_RATING = 4  # how training.dataset ranks a thumbs up without a rating


@dataclass
class TuningCandidate:
    """A well-rated answer that could become a few-shot example."""

    event_id: str
    question: str
    answer: str
    rating: int | None
    thumbs: str | None
    ts: datetime
    simulated: bool
    duplicate: bool = False  # near another candidate or an existing example
    selected: bool = False  # among the first max_examples that are not duplicates

    @property
    def quality(self) -> int:
        return self.rating if self.rating is not None else _THUMBS_UP_RATING

    def as_example(self) -> dict[str, Any]:
        """A few-shot entry: render_messages reads question and answer; the event id says where it came from."""
        return {"question": self.question, "answer": self.answer, "event_id": self.event_id}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ts": self.ts.isoformat()}


@dataclass
class TuningPlan:
    """The version a tuning would write, from `base`, and how it got there."""

    base: PromptTemplate
    candidates: list[TuningCandidate]
    system_prompt: str
    few_shot: list[dict[str, Any]]
    output_rules: list[dict[str, Any]]
    rules_applied: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        base = self.base
        return (self.system_prompt, self.few_shot, self.output_rules) != (
            base.system_prompt, list(base.few_shot or []), list(base.output_rules or []))

    def counts(self) -> dict[str, int]:
        return {
            "candidates": len(self.candidates),
            "duplicates": sum(c.duplicate for c in self.candidates),
            "selected": sum(c.selected for c in self.candidates),
            "simulated_selected": sum(c.selected and c.simulated for c in self.candidates),
            "few_shot": len(self.few_shot),
            "output_rules": len(self.output_rules),
        }


@dataclass
class TuneResult:
    plan: TuningPlan
    dry_run: bool
    created: PromptTemplate | None = None  # the new version, when one was written

    def to_dict(self) -> dict[str, Any]:
        base, created = self.plan.base, self.created
        return {
            "template_id": base.id,
            "name": base.name,
            "base_version": base.version,
            "dry_run": self.dry_run,
            "changed": self.plan.changed,
            "new_template_id": created.id if created else None,
            "new_version": created.version if created else None,
            "activated": bool(created and created.active),
            "counts": self.plan.counts(),
            "rules_applied": self.plan.rules_applied,
            "few_shot_questions": [example["question"] for example in self.plan.few_shot],
        }


def find_candidates(
    db: Database,
    template: PromptTemplate,
    *,
    since: datetime | None,
    min_rating: int,
    max_examples: int,
    encoder: Encoder,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[TuningCandidate]:
    """Every candidate of the window, best first, marked duplicate and selected (steps 1-5 above)."""
    found = [c for event, feedback in prompts.served_with(db, template.name, since)
             if (c := _candidate(event, feedback, min_rating)) is not None]
    found.sort(key=lambda c: (c.quality, c.ts, c.event_id), reverse=True)
    if not found:
        return found
    existing = [str(example.get("question", "")) for example in template.few_shot or []]
    vectors = encoder.encode([c.question for c in found] + existing)
    # Walked best first, so of two near-duplicates the better one is kept.
    rank_of = {i: rank for rank, i in enumerate(
        greedy_dedupe(vectors[: len(found)], threshold, against=vectors[len(found):]))}
    for i, candidate in enumerate(found):
        rank = rank_of.get(i)
        candidate.duplicate = rank is None
        candidate.selected = rank is not None and rank < max_examples
    return found


def plan_next_version(
    db: Database,
    template: PromptTemplate,
    *,
    since: datetime | None,
    min_rating: int = 4,
    max_examples: int = 5,
    encoder: Encoder,
    threshold: float = DEFAULT_THRESHOLD,
) -> TuningPlan:
    candidates = find_candidates(db, template, since=since, min_rating=min_rating, max_examples=max_examples,
                                 encoder=encoder, threshold=threshold)
    fresh = [c.as_example() for c in candidates if c.selected]
    approved = rules.approved(db)
    instructions = [r for r in approved if r.kind == rules.INSTRUCTION]
    outputs = [r for r in approved if r.kind in rules.OUTPUT_KINDS]
    system_prompt, added = _with_instructions(template.system_prompt, instructions)
    output_rules, added_outputs = _with_output_rules(list(template.output_rules or []), outputs)
    return TuningPlan(
        base=template,
        candidates=candidates,
        system_prompt=system_prompt,
        few_shot=(fresh + list(template.few_shot or []))[:max_examples],
        output_rules=output_rules,
        rules_applied=added + added_outputs,
    )


def tune(
    db: Database,
    template: PromptTemplate,
    *,
    days: float = 7,
    min_rating: int = 4,
    max_examples: int = 5,
    dry_run: bool = False,
    activate: bool = True,
    encoder: Encoder,
    threshold: float = DEFAULT_THRESHOLD,
    now: datetime | None = None,
) -> TuneResult:
    """Plan the next version of `template` and, unless `dry_run` or nothing changed, write it."""
    since = (now or datetime.now(UTC)) - timedelta(days=days)
    plan = plan_next_version(db, template, since=since, min_rating=min_rating, max_examples=max_examples,
                             encoder=encoder, threshold=threshold)
    if dry_run or not plan.changed:
        return TuneResult(plan, dry_run)
    created = prompts.new_version(db, name=template.name, system_prompt=plan.system_prompt,
                                  template=template.template, few_shot=plan.few_shot,
                                  output_rules=plan.output_rules, activate=activate)
    return TuneResult(plan, dry_run, created)


def _candidate(event: SearchEvent, feedback: list[Feedback], min_rating: int) -> TuningCandidate | None:
    answer = (event.answer or "").strip()
    ratings = [f.rating for f in feedback if f.rating is not None]
    thumbs = {f.thumbs for f in feedback if f.thumbs}
    corrected = any(f.corrected_answer and f.corrected_answer.strip() for f in feedback)
    negative = "down" in thumbs or any(r < min_rating for r in ratings)
    positive = "up" in thumbs or any(r >= min_rating for r in ratings)
    if not answer or corrected or negative or not positive:
        return None
    return TuningCandidate(
        event_id=event.id,
        question=redact_text(event.query),
        answer=redact_text(answer),
        rating=max(ratings) if ratings else None,
        thumbs="up" if "up" in thumbs else None,
        ts=event.ts,  # UTC-aware on every backend (store.types.UTCDateTime)
        simulated=(event.user_id or "").startswith(SIMULATED_USER_PREFIX),
    )


def _with_instructions(system_prompt: str, instructions: list[Rule]) -> tuple[str, list[str]]:
    missing = [rule for rule in instructions if rule.text not in system_prompt]
    if not missing:
        return system_prompt, []
    return system_prompt.rstrip() + "\n\n" + "\n".join(r.text for r in missing), [r.id for r in missing]


def _with_output_rules(current: list[dict[str, Any]], approved: list[Rule]) -> tuple[list[dict[str, Any]], list[str]]:
    have = {(rule.get("kind"), rule.get("text")) for rule in current}
    added = [rule for rule in approved if (rule.kind, rule.text) not in have]
    return current + [{"kind": r.kind, "text": r.text, "rule_id": r.id} for r in added], [r.id for r in added]
