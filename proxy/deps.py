"""Dependencies the routes declare: the app's state, its settings, how pages are fetched, and the admin check."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, HTTPException, Request, status

from proxy.live import Live
from proxy.metrics import Metrics
from proxy.retriever import Retriever
from proxy.upstream import Upstream
from retrieval.fetch import FetchedPage, fetch_url
from store.config import Settings
from store.db import Database
from store.logs import RedactFilter
from store.writer import EventWriter

if TYPE_CHECKING:
    from proxy.ratelimit import RateLimiter  # which imports this module

Fetch = Callable[..., Awaitable[FetchedPage]]

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
    rate_limiter: RateLimiter | None = None  # set by the lifespan
    # The logs' redaction of the configured secrets, for text that is stored rather than logged (an upstream's
    # error in the event): one, from the settings, as building it compiles a pattern.
    redact: RedactFilter = field(init=False)

    def __post_init__(self) -> None:
        self.redact = RedactFilter(self.settings.secret_values())


async def get_state(request: Request) -> AppState:
    return request.app.state.abloop


async def get_settings(request: Request) -> Settings:
    return request.app.state.abloop.settings


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_fetch() -> Fetch:
    """How process_url fetches a page: `retrieval.fetch.fetch_url` (SSRF-safe, over the network)."""
    return fetch_url


FetchDep = Annotated[Fetch, Depends(get_fetch)]


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
