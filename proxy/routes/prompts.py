"""Prompt templates for operators: versions, tuning candidates and auto-tune. Needs the admin token.

Auto-tune is the same operation as the nightly `tune_prompts` flow (training.tuning): few-shot
examples from the best-rated answers and the approved rules, written as a new version (never an
edit). Rules are proposed by the flow; these routes only apply approved ones.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from pydantic import BaseModel, Field

from proxy.deps import AdminDep, StateDep
from proxy.schemas import REQUEST_CONFIG, Integer, Text, error_responses
from store import prompts
from store.models import PromptTemplate

if TYPE_CHECKING:
    from training.tuning import TuneResult

router = APIRouter(prefix="/api/v1/prompts", tags=["prompts"], dependencies=[AdminDep],
                   responses=error_responses(401, 403, 422))

TemplateId = Annotated[Text, Path(min_length=1, max_length=64)]


class TemplateCounts(BaseModel):
    events: int  # served with this version
    feedback: int  # on those events
    few_shot: int
    output_rules: int


class TemplateSummary(BaseModel):
    id: str
    name: str
    version: int
    active: bool
    created_at: datetime
    counts: TemplateCounts


class TemplateView(TemplateSummary):
    system_prompt: str
    template: str
    few_shot: list[dict[str, Any]]
    output_rules: list[dict[str, Any]]


class TemplateList(BaseModel):
    templates: list[TemplateSummary]
    count: int


class TuningCandidateView(BaseModel):
    event_id: str
    question: str
    answer: str
    rating: int | None
    thumbs: str | None
    ts: datetime
    simulated: bool  # a simulated user's (sim-...) event: counted, as in the training dataset
    duplicate: bool  # near a better candidate or an existing example: would be dropped
    selected: bool  # would become a few-shot example


class TuningCandidates(BaseModel):
    template_id: str
    min_rating: int
    days: float
    max_examples: int
    candidates: list[TuningCandidateView]


class AutoTuneRequest(BaseModel):
    """Every field has a default: no body at all (or `{}`) means a real run with these."""

    model_config = REQUEST_CONFIG  # strict like every other body: "5" or "yes" is a 422, not coerced

    dry_run: bool = False
    max_examples: Integer = Field(5, ge=1, le=50)
    min_rating: Integer = Field(4, ge=1, le=5)
    days: float = Field(7.0, gt=0, le=365)
    similarity: float = Field(0.9, gt=0, le=1)  # cosine at which two questions are near-duplicates
    activate: bool = True  # False: the new version waits, e.g. to be an experiment's candidate arm


class TemplatePreview(BaseModel):
    """The version an auto-tune writes (or, in a dry run, would write)."""

    name: str
    system_prompt: str
    template: str
    few_shot: list[dict[str, Any]]
    output_rules: list[dict[str, Any]]


class AutoTuneResult(BaseModel):
    template_id: str  # the version tuning started from
    dry_run: bool
    changed: bool  # False: nothing new, so no version was written
    created: TemplateView | None  # the new version
    preview: TemplatePreview
    counts: dict[str, int]
    rules_applied: list[str]


class AutoTuneAll(BaseModel):
    results: list[AutoTuneResult]


@router.get("/templates", response_model=TemplateList)
async def list_templates(state: StateDep) -> TemplateList:
    """Every version of every template, newest first."""
    versions = await asyncio.to_thread(prompts.list_versions, state.db)
    usage = await asyncio.to_thread(prompts.usage, state.db, [v.id for v in versions])
    # Full views, listed as summaries: the response model leaves prompts and examples out.
    return TemplateList(templates=[_view(v, usage[v.id]) for v in versions], count=len(versions))


@router.get("/templates/{template_id}", response_model=TemplateView, responses=error_responses(404))
async def get_template(template_id: TemplateId, state: StateDep) -> TemplateView:
    template = await _template(state, template_id)
    return _view(template, (await asyncio.to_thread(prompts.usage, state.db, [template.id]))[template.id])


@router.get("/templates/{template_id}/tuning-candidates", response_model=TuningCandidates,
            responses=error_responses(404))
async def tuning_candidates(
    template_id: TemplateId,
    state: StateDep,
    min_rating: Annotated[int, Query(ge=1, le=5)] = 4,
    days: Annotated[float, Query(gt=0, le=365)] = 7.0,
    max_examples: Annotated[int, Query(ge=1, le=50)] = 5,
    similarity: Annotated[float, Query(gt=0, le=1)] = 0.9,
) -> TuningCandidates:
    """The answers auto-tune would consider, best first, each marked duplicate or selected."""
    from training.tuning import find_candidates

    template = await _template(state, template_id)
    encoder = await state.retriever.document_embedder()
    found = await asyncio.to_thread(
        find_candidates, state.db, template, since=datetime.now(UTC) - timedelta(days=days), min_rating=min_rating,
        max_examples=max_examples, encoder=encoder, threshold=similarity)
    return TuningCandidates(template_id=template.id, min_rating=min_rating, days=days, max_examples=max_examples,
                            candidates=[TuningCandidateView(**c.to_dict()) for c in found])


@router.post("/templates/auto-tune-all", response_model=AutoTuneAll, responses=error_responses(400, 413))
async def auto_tune_all(state: StateDep, body: AutoTuneRequest | None = None) -> AutoTuneAll:
    """Auto-tune every active template (what the nightly flow does after proposing rules). No body: the defaults."""
    body = body or AutoTuneRequest()
    active = await asyncio.to_thread(prompts.list_versions, state.db, active_only=True)
    return AutoTuneAll(results=[await _auto_tune(state, template, body) for template in active])


@router.post("/templates/{template_id}/auto-tune", response_model=AutoTuneResult,
             responses={201: {"description": "A new version was written"}, **error_responses(400, 404, 413)})
async def auto_tune(template_id: TemplateId, state: StateDep, response: Response,
                    body: AutoTuneRequest | None = None) -> AutoTuneResult:
    """201 with the new version; 200 with the preview for a dry run, or when nothing would change.
    No body: the defaults, as for auto-tune-all."""
    result = await _auto_tune(state, await _template(state, template_id), body or AutoTuneRequest())
    response.status_code = status.HTTP_201_CREATED if result.created else status.HTTP_200_OK
    return result


async def _auto_tune(state: StateDep, template: PromptTemplate, body: AutoTuneRequest) -> AutoTuneResult:
    from training.tuning import tune

    encoder = await state.retriever.document_embedder()
    result = await asyncio.to_thread(
        tune, state.db, template, days=body.days, min_rating=body.min_rating, max_examples=body.max_examples,
        dry_run=body.dry_run, activate=body.activate, encoder=encoder, threshold=body.similarity)
    if result.created is not None:
        await state.live.refresh()  # this replica serves an activated version at once; the others within seconds
    return _result(result)


def _result(result: TuneResult) -> AutoTuneResult:
    plan, created = result.plan, result.created
    return AutoTuneResult(
        template_id=plan.base.id,
        dry_run=result.dry_run,
        changed=plan.changed,
        created=_view(created, {"events": 0, "feedback": 0}) if created is not None else None,
        preview=TemplatePreview(name=plan.base.name, system_prompt=plan.system_prompt, template=plan.base.template,
                                few_shot=plan.few_shot, output_rules=plan.output_rules),
        counts=plan.counts(),
        rules_applied=plan.rules_applied,
    )


async def _template(state: StateDep, template_id: str) -> PromptTemplate:
    template = await asyncio.to_thread(prompts.get, state.db, template_id)
    if template is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown prompt template {template_id!r}")
    return template


def _view(template: PromptTemplate, usage: dict[str, int]) -> TemplateView:
    few_shot, output_rules = list(template.few_shot or []), list(template.output_rules or [])
    return TemplateView(
        id=template.id, name=template.name, version=template.version, active=template.active,
        created_at=template.created_at, system_prompt=template.system_prompt, template=template.template,
        few_shot=few_shot, output_rules=output_rules,
        counts=TemplateCounts(**usage, few_shot=len(few_shot), output_rules=len(output_rules)),
    )
