"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response, status
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from proxy.deps import StateDep

router = APIRouter(tags=["health"])


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool]  # index loaded, store reachable
    index_version: str | None


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "No index loaded, or the store unreachable"}})
async def readyz(state: StateDep) -> JSONResponse:
    store_ok = await asyncio.to_thread(state.db.ping)
    checks = {"index": state.retriever.version is not None, "store": store_ok}
    ready = all(checks.values())
    return JSONResponse(
        {"ready": ready, "checks": checks, "index_version": state.retriever.version},
        status_code=status.HTTP_200_OK if ready else status.HTTP_503_SERVICE_UNAVAILABLE,
    )


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format"}})
async def metrics(state: StateDep) -> Response:
    """This process's series; with several workers, the whole server's (all workers', summed)."""
    return Response(state.metrics.scrape(), media_type=CONTENT_TYPE_LATEST)
