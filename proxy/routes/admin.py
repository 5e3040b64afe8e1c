"""Operator endpoints. Every route here needs `Authorization: Bearer $ADMIN_TOKEN`."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, HTTPException, status

from experiment import lifecycle
from experiment.metrics import DEFAULT_PRIMARY
from proxy.deps import AdminDep, StateDep
from proxy.schemas import (
    ArmView,
    ExperimentUpdate,
    ExperimentView,
    IndexView,
    ProcessUrlRequest,
    ProcessUrlResponse,
    PromoteRequest,
    RollbackRequest,
)
from retrieval.fetch import FetchError, UnsafeURLError, fetch_url
from store.models import Experiment

log = logging.getLogger("abloop.proxy")

router = APIRouter(prefix="/api/v1", tags=["admin"], dependencies=[AdminDep])


def _view(experiment: Experiment) -> ExperimentView:
    candidate = None
    if experiment.candidate_base_url:
        candidate = ArmView(
            base_url=experiment.candidate_base_url,
            model=experiment.candidate_model,
            adapter_id=experiment.candidate_adapter_id,
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


@router.put("/admin/experiment", response_model=ExperimentView)
async def update_experiment(body: ExperimentUpdate, state: StateDep) -> ExperimentView:
    """A share change starts a new phase; a new candidate starts a new experiment; a rollout ramps by steps."""
    current = (await state.live.refresh()).experiment
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


@router.post("/admin/promote", response_model=ExperimentView)
async def promote(body: PromoteRequest, state: StateDep) -> ExperimentView:
    """Candidate becomes control and the share returns to 0 (see `experiment.lifecycle.promote`)."""
    return await _conclude(state, body.experiment_id, lifecycle.promote, force=body.force)


@router.post("/admin/rollback", response_model=ExperimentView)
async def rollback(body: RollbackRequest, state: StateDep) -> ExperimentView:
    """The experiment ends rolled_back and every user is served by control (`experiment.lifecycle.rollback`)."""
    return await _conclude(state, body.experiment_id, lifecycle.rollback, reason=body.reason)


@router.post("/process_url", response_model=ProcessUrlResponse)
async def process_url(body: ProcessUrlRequest, state: StateDep) -> ProcessUrlResponse:
    settings = state.settings
    try:
        page = await fetch_url(body.url, max_bytes=settings.ingest_max_bytes, timeout_s=settings.ingest_timeout_s,
                               transport=state.ingest_transport, resolver=state.ingest_resolver)
    except UnsafeURLError as error:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"url refused: {error}") from None
    except FetchError as error:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"url could not be fetched: {error}") from None
    if not page.text.strip():
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "url: the page has no extractable text")
    index, added = await state.retriever.add_page(page)
    log.info("ingested %s chunks into index %s", added, index.version)
    return ProcessUrlResponse(url=body.url, final_url=page.final_url, title=page.title,
                              chunks_added=added, index_version=index.version)


@router.post("/admin/reload-index", response_model=IndexView)
async def reload_index(state: StateDep) -> IndexView:
    if state.retriever.store.current_version() is None:
        raise HTTPException(status.HTTP_409_CONFLICT, "no index in INDEX_DIR; run `abloop index build` first")
    index = await state.retriever.reload()
    return IndexView(index_version=index.version, chunks=len(index))
