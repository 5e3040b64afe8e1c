"""Request and response bodies of the HTTP contract (DESIGN.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

ArmName = Literal["control", "candidate"]
# experiment.metrics.PRIMARY_METRICS (a test keeps the two equal).
PrimaryMetric = Literal["satisfaction", "thumbs_up_per_request", "thumbs_up_rate", "mean_rating", "answer_score",
                        "judge_score"]


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
    # The document's LLM metadata (METADATA_API_BASE); empty where none was extracted.
    tags: list[str] = []
    category: str | None = None


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
    # A prompt template version the candidate renders with (same model, another prompt).
    prompt_template_id: str | None = Field(None, min_length=1, max_length=36)


class ArmView(BaseModel):
    base_url: str
    model: str
    adapter_id: str | None = None
    prompt_template_id: str | None = None  # None: the active template


class RolloutConfig(BaseModel):
    """Ramp steps for the candidate's share; `evaluate_arms` advances them (experiment.rollout)."""

    model_config = ConfigDict(extra="forbid")

    steps: list[float] = Field(min_length=1, max_length=20)
    min_users_per_step: int = Field(100, ge=0)
    min_hours_per_step: float = Field(1.0, ge=0)
    auto_promote: bool = True

    @field_validator("steps")
    @classmethod
    def _rising_shares(cls, steps: list[float]) -> list[float]:
        if any(not 0 < s <= 1 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError("shares must rise strictly, each in (0, 1]")
        return steps


class ExperimentView(BaseModel):
    id: str
    status: str
    arms: dict[str, ArmView | None]
    candidate_share: float
    salt: str
    started_at: datetime
    primary_metric: str
    rollout: dict[str, Any] | None = None
    ended_at: datetime | None = None
    decision: dict[str, Any] | None = None


class ExperimentUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidate_share: float | None = Field(None, ge=0.0, le=1.0)
    candidate: ArmConfig | None = None
    rollout: RolloutConfig | None = None
    primary_metric: PrimaryMetric | None = None

    @model_validator(mode="after")
    def _needs_a_change(self) -> ExperimentUpdate:
        if self.candidate_share is None and self.candidate is None and self.rollout is None:
            raise ValueError("give candidate_share, candidate, rollout, or a combination")
        if self.primary_metric is not None and self.candidate is None:
            raise ValueError("primary_metric is set when a candidate starts a new experiment")
        if self.rollout is not None and self.candidate_share is not None:
            raise ValueError("give candidate_share or rollout, not both: the rollout sets the share")
        return self


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experiment_id: str = Field(min_length=1, max_length=64)
    force: bool = False


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experiment_id: str = Field(min_length=1, max_length=64)
    reason: str | None = Field(None, max_length=1000)


class ProcessUrlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)


class ProcessUrlResponse(BaseModel):
    url: str
    final_url: str
    title: str  # the extracted title where metadata was extracted, else the page's own
    chunks_added: int
    index_version: str
    # extracted; off (METADATA_API_BASE unset); failed (indexed without metadata, see the proxy log).
    metadata: Literal["extracted", "off", "failed"] = "off"
    tags: list[str] = []
    category: str | None = None


class IndexView(BaseModel):
    index_version: str | None
    chunks: int
