"""Rules proposed from users' corrections, for an operator to approve or reject. Needs the admin token.

Proposals are made by the `tune_prompts` flow (training.rules); approved rules go into the next
prompt template version it (or `POST /api/v1/prompts/templates/{id}/auto-tune`) writes.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query, status
from pydantic import BaseModel

from proxy.deps import AdminDep, StateDep
from proxy.schemas import Text, error_responses
from store import rules
from store.models import Rule

router = APIRouter(prefix="/api/v1/rules", tags=["rules"], dependencies=[AdminDep],
                   responses=error_responses(401, 403, 422))

RuleStatus = Literal["proposed", "approved", "rejected"]  # store.rules.STATUSES
RuleId = Annotated[Text, Path(min_length=1, max_length=64)]


class RuleView(BaseModel):
    id: str
    status: RuleStatus
    kind: str
    text: str
    feedback_ids: list[str]
    support: int
    created_at: datetime
    decided_at: datetime | None = None

    @classmethod
    def of(cls, rule: Rule) -> RuleView:
        ids = list(rule.feedback_ids or [])
        return cls(id=rule.id, status=rule.status, kind=rule.kind, text=rule.text, feedback_ids=ids,
                   support=len(ids), created_at=rule.created_at, decided_at=rule.decided_at)


class RuleList(BaseModel):
    rules: list[RuleView]
    count: int


@router.get("", response_model=RuleList)
async def list_rules(
    state: StateDep, rule_status: Annotated[RuleStatus | None, Query(alias="status")] = None
) -> RuleList:
    """Newest first; `?status=proposed` for the ones waiting for a decision."""
    found = await asyncio.to_thread(rules.list_rules, state.db, rule_status)
    return RuleList(rules=[RuleView.of(rule) for rule in found], count=len(found))


@router.post("/{rule_id}/approve", response_model=RuleView, responses=error_responses(404, 409))
async def approve(rule_id: RuleId, state: StateDep) -> RuleView:
    """The rule goes into the next prompt template version."""
    return await _decide(state, rule_id, rules.APPROVED)


@router.post("/{rule_id}/reject", response_model=RuleView, responses=error_responses(404, 409))
async def reject(rule_id: RuleId, state: StateDep) -> RuleView:
    return await _decide(state, rule_id, rules.REJECTED)


async def _decide(state: StateDep, rule_id: str, decision: str) -> RuleView:
    """404 for an unknown rule, 409 for one already approved or rejected."""
    try:
        rule = await asyncio.to_thread(rules.decide, state.db, rule_id, decision)
    except rules.RuleNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown rule_id {rule_id!r}") from None
    except rules.RuleAlreadyDecided as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    return RuleView.of(rule)
