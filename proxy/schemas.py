"""Request and response bodies of the HTTP contract (DESIGN.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

ArmName = Literal["control", "candidate"]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=4000)
    user_id: str | None = Field(None, min_length=1, max_length=256)
    session_id: str | None = Field(None, max_length=256)
    top_k: int = Field(5, ge=1, le=50)


class Item(BaseModel):
    id: str
    title: str
    source: str
    score: float
    text: str


class Timings(BaseModel):
    retrieval: float
    llm: float
    total: float


class SearchResponse(BaseModel):
    request_id: str
    arm: ArmName
    served_arm: ArmName
    model: str
    answer: str
    items: list[Item]
    timings_ms: Timings


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=64)
    rating: int | None = Field(None, ge=1, le=5)
    thumbs: Literal["up", "down"] | None = None
    corrected_answer: str | None = Field(None, min_length=1, max_length=20_000)
    comment: str | None = Field(None, max_length=4000)

    @model_validator(mode="after")
    def _needs_a_signal(self) -> FeedbackRequest:
        if self.rating is None and self.thumbs is None and self.corrected_answer is None:
            raise ValueError("at least one of rating, thumbs or corrected_answer is required")
        return self


class FeedbackResponse(BaseModel):
    feedback_id: str


class ArmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_url: HttpUrl
    model: str = Field(min_length=1, max_length=256)
    adapter_id: str | None = None


class ArmView(BaseModel):
    base_url: str
    model: str
    adapter_id: str | None = None


class ExperimentView(BaseModel):
    id: str
    status: str
    arms: dict[str, ArmView | None]
    candidate_share: float
    salt: str
    started_at: datetime


class ExperimentUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidate_share: float | None = Field(None, ge=0.0, le=1.0)
    candidate: ArmConfig | None = None

    @model_validator(mode="after")
    def _needs_a_change(self) -> ExperimentUpdate:
        if self.candidate_share is None and self.candidate is None:
            raise ValueError("give candidate_share, candidate, or both")
        return self


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experiment_id: str = Field(min_length=1)
    force: bool = False


class ProcessUrlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)


class ProcessUrlResponse(BaseModel):
    url: str
    final_url: str
    title: str
    chunks_added: int
    index_version: str


class IndexView(BaseModel):
    index_version: str | None
    chunks: int
