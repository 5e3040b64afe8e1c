"""Operator endpoints. Every route here needs `Authorization: Bearer $ADMIN_TOKEN`."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, HTTPException, status

from experiment import lifecycle
from experiment.decision import Policy
from experiment.metrics import DEFAULT_PRIMARY
from proxy.deps import AdminDep, Fetch, FetchDep, StateDep
from proxy.schemas import (
    ArmView,
    ExperimentUpdate,
    ExperimentView,
    IndexView,
    ProcessUrlRequest,
    ProcessUrlResponse,
    PromoteRequest,
    RollbackRequest,
    error_responses,
)
from retrieval.fetch import FetchedPage, FetchError, UnsafeURLError
from retrieval.metadata import DocumentMetadata, MetadataError, MetadataExtractor
from store import prompts
from store.models import Experiment

log = logging.getLogger("abloop.proxy")

router = APIRouter(prefix="/api/v1", tags=["admin"], dependencies=[AdminDep],
                   responses=error_responses(401, 403, 422))


def _view(experiment: Experiment) -> ExperimentView:
    candidate = None
    if experiment.candidate_base_url:
        candidate = ArmView(
            base_url=experiment.candidate_base_url,
            model=experiment.candidate_model,
            adapter_id=experiment.candidate_adapter_id,
            prompt_template_id=experiment.candidate_prompt_template_id,
        )
    return ExperimentView(
        id=experiment.id,
        status=experiment.status,
        arms={
            "control": ArmView(
                base_url=experiment.control_base_url,
                model=experiment.control_model,
                adapter_id=experiment.control_adapter_id,
            ),
            "candidate": candidate,
        },
        candidate_share=experiment.candidate_share,
        salt=experiment.salt,
        started_at=experiment.started_at,
        primary_metric=experiment.primary_metric or DEFAULT_PRIMARY,
        rollout=experiment.rollout,
        ended_at=experiment.ended_at,
        decision=experiment.decision,
    )


@router.get("/admin/experiment", response_model=ExperimentView)
async def get_experiment(state: StateDep) -> ExperimentView:
    return _view((await state.live.refresh()).experiment)


@router.put("/admin/experiment", response_model=ExperimentView, responses=error_responses(400, 409, 413))
async def update_experiment(body: ExperimentUpdate, state: StateDep) -> ExperimentView:
    """A share change starts a new phase; a new candidate starts a new experiment; a rollout ramps by steps."""
    current = (await state.live.refresh()).experiment
    template_id = body.candidate.prompt_template_id if body.candidate is not None else None
    if template_id is not None and await asyncio.to_thread(prompts.get, state.db, template_id) is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"candidate.prompt_template_id: unknown prompt template {template_id[:36]!r}")
    try:
        if body.candidate is not None:
            current = await asyncio.to_thread(
                lifecycle.start_candidate,
                state.db,
                base_url=str(body.candidate.base_url).rstrip("/"),
                model=body.candidate.model,
                adapter_id=body.candidate.adapter_id,
                share=0.0 if body.rollout is not None else body.candidate_share,
                primary_metric=body.primary_metric,
                reason="new candidate via admin-api",
                prompt_template_id=template_id,
            )
        elif body.candidate_share is not None:
            await asyncio.to_thread(lifecycle.set_share, state.db, current.id, body.candidate_share,
                                    reason="share set via admin-api")
        if body.rollout is not None:
            await asyncio.to_thread(lifecycle.set_rollout, state.db, current.id, body.rollout.model_dump(),
                                    reason="rollout started via admin-api")
    except lifecycle.ExperimentNotRunning as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    return _view((await state.live.refresh()).experiment)


async def _conclude(state: StateDep, experiment_id: str, operation, **kwargs) -> ExperimentView:
    """Run promote or rollback; 404 for an unknown experiment, 409 when it cannot end that way now."""
    try:
        await asyncio.to_thread(operation, state.db, experiment_id, via="admin-api", **kwargs)
    except lifecycle.ExperimentNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown experiment_id {experiment_id!r}") from None
    except (lifecycle.NoPromoteDecision, lifecycle.ExperimentNotRunning) as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    return _view((await state.live.refresh()).experiment)


@router.post("/admin/promote", response_model=ExperimentView, responses=error_responses(400, 404, 409, 413))
async def promote(body: PromoteRequest, state: StateDep) -> ExperimentView:
    """Candidate becomes control and the share returns to 0 (see `experiment.lifecycle.promote`)."""
    return await _conclude(state, body.experiment_id, lifecycle.promote, force=body.force,
                           policy=Policy.from_settings(state.settings))


@router.post("/admin/rollback", response_model=ExperimentView, responses=error_responses(400, 404, 409, 413))
async def rollback(body: RollbackRequest, state: StateDep) -> ExperimentView:
    """The experiment ends rolled_back and every user is served by control (`experiment.lifecycle.rollback`)."""
    return await _conclude(state, body.experiment_id, lifecycle.rollback, reason=body.reason)


# The process_url outcome (abloop_process_url_total) of each refusal it answers with.
_PROCESS_URL_OUTCOMES = {status.HTTP_400_BAD_REQUEST: "refused", status.HTTP_502_BAD_GATEWAY: "fetch_error",
                         status.HTTP_422_UNPROCESSABLE_CONTENT: "empty"}


@router.post("/process_url", response_model=ProcessUrlResponse, responses=error_responses(400, 413, 502))
async def process_url(body: ProcessUrlRequest, state: StateDep, fetch: FetchDep) -> ProcessUrlResponse:
    """Fetch (SSRF-safe), extract text and optional LLM metadata, chunk, embed, add to the index; counted and timed."""
    started = time.perf_counter()
    outcome = "error"
    try:
        response = await _ingest_url(body.url, state, fetch)
        outcome = "ok"
        return response
    except HTTPException as error:
        outcome = _PROCESS_URL_OUTCOMES.get(error.status_code, "error")
        raise
    finally:
        state.metrics.process_url.labels(outcome).inc()
        state.metrics.process_url_latency.observe(time.perf_counter() - started)


async def _ingest_url(url: str, state: StateDep, fetch: Fetch) -> ProcessUrlResponse:
    settings = state.settings
    try:
        page = await fetch(url, max_bytes=settings.ingest_max_bytes, timeout_s=settings.ingest_timeout_s)
    except UnsafeURLError as error:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"url refused: {error}") from None
    except FetchError as error:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"url could not be fetched: {error}") from None
    if not page.text.strip():
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "url: the page has no extractable text")
    metadata = await _metadata(page, state) if settings.metadata_api_base else None
    index, added = await state.retriever.add_page(page, metadata)
    log.info("ingested %s chunks into index %s", added, index.version)
    if metadata is not None:
        labels = {"metadata": "extracted", "title": metadata.title, "tags": list(metadata.tags),
                  "category": metadata.category}
    else:
        labels = {"metadata": "failed" if settings.metadata_api_base else "off", "title": page.title}
    return ProcessUrlResponse(url=url, final_url=page.final_url, chunks_added=added, index_version=index.version,
                              **labels)


async def _metadata(page: FetchedPage, state: StateDep) -> DocumentMetadata | None:
    """The page's LLM metadata, or None when the endpoint gives none: the page is indexed all the same."""
    settings = state.settings

    def _extract() -> DocumentMetadata:
        with MetadataExtractor(settings.metadata_api_base, settings.metadata_model, settings.llm_key(),
                               settings.llm_timeout_s) as extractor:
            return extractor.extract(page.title or page.final_url, page.text, page.final_url)

    try:
        metadata = await asyncio.to_thread(_extract)
    except MetadataError as error:
        state.metrics.metadata_extraction.labels(error.outcome).inc()
        log.warning("no metadata for %s (%s), indexed without it: %s", page.final_url, error.outcome, error)
        return None
    state.metrics.metadata_extraction.labels("ok").inc()
    return metadata


@router.post("/admin/reload-index", response_model=IndexView, responses=error_responses(409))
async def reload_index(state: StateDep) -> IndexView:
    if state.retriever.store.current_version() is None:
        raise HTTPException(status.HTTP_409_CONFLICT, "no index in INDEX_DIR; run `abloop index build` first")
    index = await state.retriever.reload()
    return IndexView(index_version=index.version, chunks=len(index))
