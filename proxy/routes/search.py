"""POST /api/v1/search and POST /api/v1/feedback: the end users' side of the contract."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, status
from sqlalchemy.exc import SQLAlchemyError

from experiment.assignment import Arm, assign_arm, bucket
from proxy.deps import AppState, StateDep
from proxy.live import Snapshot
from proxy.observability import request_fields
from proxy.ratelimit import RateLimitDep
from proxy.schemas import (
    FeedbackRequest,
    FeedbackResponse,
    HeaderText,
    Item,
    SearchRequest,
    SearchResponse,
    Timings,
    error_responses,
)
from proxy.upstream import AllArmsFailed, Completion, Failure, describe
from store import tracing
from store.config import Settings
from store.events import event_exists
from store.logs import RedactFilter
from store.models import id_time, new_id, utcnow
from store.prompts import apply_output_rules, render_messages

# Both routes are rate limited per user (429 with Retry-After); a refused search is not logged as an event.
router = APIRouter(prefix="/api/v1", tags=["search"], dependencies=[RateLimitDep])
log = logging.getLogger("abloop.proxy")


@router.post("/search", response_model=SearchResponse, responses=error_responses(400, 413, 422, 429, 502, 504))
async def search(
    body: SearchRequest,
    state: StateDep,
    x_user_id: Annotated[HeaderText | None, Header(max_length=256)] = None,
) -> SearchResponse:
    started = time.perf_counter()
    user_id = body.user_id or x_user_id or None
    snapshot = state.live.snapshot
    arm = assign_arm(snapshot.experiment.salt, user_id, snapshot.experiment.candidate_share, snapshot.has_candidate)
    request_id = new_id()
    with request_fields(request_id=request_id, experiment_id=snapshot.experiment.id, arm=arm,
                        **_who(user_id, snapshot.experiment.salt, state.settings)):
        return await _search(body, state, snapshot, arm, user_id, request_id, started)


def _who(user_id: str | None, salt: str, settings: Settings) -> dict[str, Any]:
    """How log lines name the user: the hash bucket (DESIGN, "Routing"), the raw id only with LOG_USER_ID."""
    if settings.log_user_id:
        return {"user_id": user_id}
    return {"bucket": bucket(salt, user_id) if user_id is not None else None}


async def _search(body: SearchRequest, state: AppState, snapshot: Snapshot, arm: Arm, user_id: str | None,
                  request_id: str, started: float) -> SearchResponse:
    hits = await state.retriever.search(body.query, body.top_k)
    retrieval_ms = (time.perf_counter() - started) * 1000
    prompt = snapshot.prompt_for(arm)
    messages = render_messages(prompt.system_prompt, prompt.template, prompt.few_shot or [], hits, body.query)

    event: dict[str, Any] = {
        "id": request_id,
        "ts": utcnow(),
        "user_id": user_id,
        "session_id": body.session_id,
        "experiment_id": snapshot.experiment.id,
        "arm": arm,
        "query": body.query,
        "messages": messages,
        "retrieved": {
            "ids": [hit.id for hit in hits],
            "scores": [round(hit.score, 6) for hit in hits],
            "index_version": state.retriever.version,
        },
        "prompt_template_id": prompt.id,
        "prompt_template_version": prompt.version,
        "trace_id": tracing.current_trace_id(),
    }
    try:
        completion = await state.upstream.complete(snapshot.plan(arm), messages)
    except AllArmsFailed as failure:
        total_ms = (time.perf_counter() - started) * 1000
        code = status.HTTP_504_GATEWAY_TIMEOUT if failure.timed_out else status.HTTP_502_BAD_GATEWAY
        _log(state, event, None, retrieval_ms, total_ms, code, failures=failure.failures)
        # Each arm's generic reason only: the upstream's own text may echo our Authorization header.
        raise HTTPException(code, {"message": "every arm failed", "request_id": request_id,
                                   "failures": [str(f) for f in failure.failures]}) from None

    if prompt.output_rules:
        # The answer the user reads is the one logged: feedback and corrections are about it.
        answer = apply_output_rules(completion.answer, prompt.output_rules, [hit.title for hit in hits])
        completion = dataclasses.replace(completion, answer=answer)
    total_ms = (time.perf_counter() - started) * 1000
    _log(state, event, completion, retrieval_ms, total_ms, status.HTTP_200_OK)
    return SearchResponse(
        request_id=request_id,
        arm=arm,
        served_arm=completion.served_arm,
        model=completion.model,
        answer=completion.answer,
        items=[Item(id=h.id, title=h.title, source=h.source, score=h.score, text=h.text, tags=list(h.tags),
                    category=h.category) for h in hits],
        timings_ms=Timings(retrieval=round(retrieval_ms, 3), llm=round(completion.llm_ms, 3), total=round(total_ms, 3)),
    )


def _log(
    state: AppState,
    event: dict[str, Any],
    completion: Completion | None,
    retrieval_ms: float,
    total_ms: float,
    http_status: int,
    *,
    failures: list[Failure] | tuple[Failure, ...] = (),
) -> None:
    """Queue the event (off the hot path), count it, and log its line."""
    arm = event["arm"]
    if completion is None:
        status_, served_arm = "error", None
    else:
        served_arm = completion.served_arm
        status_ = "ok" if served_arm == arm else "fallback"
        failures = completion.failures
    event.update(
        served_arm=served_arm,
        model=completion.model if completion else None,
        answer=completion.answer if completion else None,
        status=status_,
        error=_stored_error(failures, state.redact),
        timings={"retrieval": retrieval_ms, "llm": completion.llm_ms if completion else None, "total": total_ms},
        tokens_in=completion.tokens_in if completion else None,
        tokens_out=completion.tokens_out if completion else None,
    )
    with tracing.span("store enqueue"):
        state.writer.submit("search_events", event)
    _log_line(event, http_status)

    metrics = state.metrics
    metrics.requests.labels(arm, served_arm or "none", status_).inc()
    metrics.latency.labels(arm).observe(total_ms / 1000)
    metrics.retrieval_latency.observe(retrieval_ms / 1000)
    if status_ == "fallback":
        metrics.fallbacks.labels(arm).inc()
    for failure in failures:
        metrics.upstream_errors.labels(failure.arm).inc()
    if completion is not None:
        metrics.llm_latency.labels(served_arm).observe(completion.llm_ms / 1000)
        if completion.tokens_in is not None:
            metrics.tokens.labels(arm, "in").inc(completion.tokens_in)
        if completion.tokens_out is not None:
            metrics.tokens.labels(arm, "out").inc(completion.tokens_out)


def _stored_error(failures: list[Failure] | tuple[Failure, ...], redact: RedactFilter) -> str | None:
    """The failures with the upstreams' own words (what an operator needs), secrets redacted as in the logs:
    an upstream that echoes the request would otherwise put LLM_API_KEY in the store and the exported events."""
    described = describe(failures)
    return redact.redact(described) if described else None


def _log_line(event: dict[str, Any], http_status: int) -> None:
    """The search's line: "search answered" (INFO; a fallback also gets a WARNING with the reason) or "search
    failed". The request's bound fields add request_id, experiment_id, the assigned arm and the user's bucket."""
    failed = event["status"] == "error"
    if event["status"] == "fallback":
        log.warning("search fell back to the other arm", extra={"served_arm": event["served_arm"],
                                                                 "reason": event["error"]})
    if not log.isEnabledFor(logging.WARNING if failed else logging.INFO):
        return
    fields = {
        "served_arm": event["served_arm"],
        "status": event["status"],
        "model": event["model"],
        "timings_ms": {key: None if value is None else round(value, 3) for key, value in event["timings"].items()},
        "http_status": http_status,
    }
    if failed:
        log.warning("search failed", extra={**fields, "reason": event["error"]})
    else:
        log.info("search answered", extra=fields)


@router.post("/feedback", status_code=status.HTTP_201_CREATED, response_model=FeedbackResponse,
             responses=error_responses(400, 404, 413, 422, 429, 503))
async def feedback(body: FeedbackRequest, state: StateDep) -> FeedbackResponse:
    with request_fields(request_id=body.request_id):
        return await _feedback(body, state)


async def _feedback(body: FeedbackRequest, state: AppState) -> FeedbackResponse:
    # Our request ids are UUIDs: anything else cannot exist, and is never sent to the store (PostgreSQL
    # refuses a NUL in a query parameter, which would read as "store unreachable").
    if not _is_request_id(body.request_id) or not await _event_known(state, body.request_id):
        if _may_be_on_its_way(body.request_id, state.settings.feedback_pending_window_s):
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                "this request_id is recent and not in the store yet (another replica may still be writing it); "
                "retry shortly",
                headers={"Retry-After": "2"},
            )
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown request_id {body.request_id[:64]!r}")
    feedback_id = new_id()
    state.writer.submit(
        "feedback",
        {
            "id": feedback_id,
            "event_id": body.request_id,
            "ts": utcnow(),
            "rating": body.rating,
            "thumbs": body.thumbs,
            "corrected_answer": body.corrected_answer,
            "comment": body.comment,
        },
    )
    _count_feedback(state, body)
    # What was given, never the text of a comment or correction.
    log.info("feedback received", extra={"feedback_id": feedback_id, "rating": body.rating, "thumbs": body.thumbs,
                                         "correction": body.corrected_answer is not None,
                                         "comment": body.comment is not None})
    return FeedbackResponse(feedback_id=feedback_id)


def _is_request_id(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _may_be_on_its_way(request_id: str, window_s: float) -> bool:
    """A request id minted less than `window_s` ago (ids are UUIDv7): its event may not be visible yet.

    Measured by bench/soak.py with two replicas: feedback sent to the other replica right after a store
    outage found its event neither in that replica's queue nor in the store (still in the first one's spool).
    """
    if not _is_request_id(request_id):
        return False
    made = id_time(request_id)
    return made is not None and (utcnow() - made).total_seconds() < window_s


async def _event_known(state: AppState, event_id: str) -> bool:
    """In this replica's write queue, or in the store.

    Another replica may still hold the event in its queue for one flush interval, so a miss
    is checked once more after a short wait before it becomes a 404.
    """
    for attempt in range(2):
        if state.writer.is_pending(event_id):
            return True
        try:
            if await asyncio.to_thread(event_exists, state.db, event_id):
                return True
        except SQLAlchemyError:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                "the store is unreachable and this request_id is not in this replica's queue; retry shortly",
                headers={"Retry-After": "2"},
            ) from None
        if attempt == 0:
            await asyncio.sleep(max(0.2, 2 * state.settings.writer_flush_interval_s))
    return False


def _count_feedback(state: AppState, body: FeedbackRequest) -> None:
    counter = state.metrics.feedback
    if body.rating is not None:
        counter.labels("rating").inc()
    if body.thumbs is not None:
        counter.labels(f"thumbs_{body.thumbs}").inc()
    if body.corrected_answer is not None:
        counter.labels("correction").inc()
