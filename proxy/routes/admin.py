"""Operator endpoints. Every route here needs `Authorization: Bearer $ADMIN_TOKEN`."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, HTTPException, status

from proxy.deps import AdminDep, StateDep
from proxy.schemas import (
    ArmView,
    ExperimentUpdate,
    ExperimentView,
    IndexView,
    ProcessUrlRequest,
    ProcessUrlResponse,
    PromoteRequest,
)
from retrieval.fetch import FetchError, UnsafeURLError, fetch_url
from store import experiments
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
    )


@router.get("/admin/experiment", response_model=ExperimentView)
async def get_experiment(state: StateDep) -> ExperimentView:
    return _view((await state.live.refresh()).experiment)


@router.put("/admin/experiment", response_model=ExperimentView)
async def update_experiment(body: ExperimentUpdate, state: StateDep) -> ExperimentView:
    current = (await state.live.refresh()).experiment
    if body.candidate is not None:
        await asyncio.to_thread(
            experiments.start_candidate,
            state.db,
            base_url=str(body.candidate.base_url).rstrip("/"),
            model=body.candidate.model,
            adapter_id=body.candidate.adapter_id,
            share=body.candidate_share,
        )
    else:
        await asyncio.to_thread(experiments.set_share, state.db, current.id, body.candidate_share)
    return _view((await state.live.refresh()).experiment)


@router.post("/admin/promote", response_model=ExperimentView)
async def promote(body: PromoteRequest, state: StateDep) -> ExperimentView:
    """Candidate becomes control and the share returns to 0 (see `store.experiments.promote`)."""
    try:
        await asyncio.to_thread(experiments.promote, state.db, body.experiment_id, force=body.force, via="admin-api")
    except experiments.ExperimentNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown experiment_id {body.experiment_id!r}") from None
    except (experiments.NoPromoteDecision, experiments.ExperimentNotRunning) as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    return _view((await state.live.refresh()).experiment)


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
