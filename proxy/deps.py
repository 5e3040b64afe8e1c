"""Dependencies the routes declare: the app's state, its settings, and the admin check."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request, status

from proxy.live import Live
from proxy.metrics import Metrics
from proxy.retriever import Retriever
from proxy.upstream import Upstream
from store.config import Settings
from store.db import Database
from store.writer import EventWriter

# Dependencies are async on purpose: FastAPI runs plain `def` dependencies in a thread pool,
# which costs a thread hand-off on every request.


@dataclass
class AppState:
    settings: Settings
    db: Database
    writer: EventWriter
    retriever: Retriever
    live: Live
    upstream: Upstream
    metrics: Metrics
    # Test seams for URL ingestion: an httpx transport and a DNS resolver (None = the real ones).
    ingest_transport: Any = None
    ingest_resolver: Any = None


async def get_state(request: Request) -> AppState:
    return request.app.state.abloop


async def get_settings(request: Request) -> Settings:
    return request.app.state.abloop.settings


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def require_admin(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """401 without a bearer token, 403 with a wrong one, 403 for everyone while ADMIN_TOKEN is unset."""
    if settings.admin_token is None or not settings.admin_token.get_secret_value():
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin endpoints are disabled: ADMIN_TOKEN is not set")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token in the Authorization header",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(given.encode(), settings.admin_token.get_secret_value().encode()):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong admin token")


AdminDep = Depends(require_admin)
