"""Request and response bodies of the HTTP contract (DESIGN.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    HttpUrl,
    UrlConstraints,
    field_validator,
    model_validator,
)


def _encodable(value: str) -> str:
    # JSON's "\ud800" escape decodes to a lone surrogate, which no response, log line or store row can encode.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text, not a lone surrogate") from None
    return value


def utf8_header(value: object) -> object:
    """A header value as the client sent it: Starlette decodes header bytes as Latin-1, the contract's
    headers are UTF-8, so the same bytes are decoded again. Not UTF-8: ValueError."""
    if not isinstance(value, str):
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise ValueError("must be UTF-8") from None


def _whole_number(value: object) -> object:
    # JSON Schema counts 43.0 as an integer, and strict mode (below) alone would refuse it.
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Every client-supplied string and integer: these types, not `str` and `int`.
Text = Annotated[str, AfterValidator(_encodable)]
HeaderText = Annotated[str, BeforeValidator(utf8_header)]
Integer = Annotated[int, BeforeValidator(_whole_number)]

# Request bodies: unknown fields, NaN or infinity, and values of another JSON type ("5" or true for a
# number) are 422s, so that a body the OpenAPI schema rejects is never accepted.
REQUEST_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

ArmName = Literal["control", "candidate"]
# experiment.metrics.PRIMARY_METRICS (a test keeps the two equal).
PrimaryMetric = Literal["satisfaction", "thumbs_up_per_request", "thumbs_up_rate", "mean_rating", "answer_score",
                        "judge_score"]


class SearchRequest(BaseModel):
    model_config = REQUEST_CONFIG

    query: Text = Field(min_length=1, max_length=4000)
    user_id: Text | None = Field(None, min_length=1, max_length=256)
    session_id: Text | None = Field(None, max_length=256)
    top_k: Integer = Field(5, ge=1, le=50)


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
    model_config = REQUEST_CONFIG

    request_id: Text = Field(min_length=1, max_length=64)
    rating: Integer | None = Field(None, ge=1, le=5)
    thumbs: Literal["up", "down"] | None = None
    corrected_answer: Text | None = Field(None, min_length=1, max_length=20_000)
    comment: Text | None = Field(None, max_length=4000)

    @model_validator(mode="after")
    def _needs_a_signal(self) -> FeedbackRequest:
        if self.rating is None and self.thumbs is None and self.corrected_answer is None:
            raise ValueError("at least one of rating, thumbs or corrected_answer is required")
        return self


class FeedbackResponse(BaseModel):
    feedback_id: str


class ArmConfig(BaseModel):
    model_config = REQUEST_CONFIG

    base_url: Annotated[HttpUrl, UrlConstraints(max_length=1024)]  # the store's column widths
    model: Text = Field(min_length=1, max_length=256)
    adapter_id: Text | None = Field(None, max_length=36)
    # A prompt template version the candidate renders with (same model, another prompt).
    prompt_template_id: Text | None = Field(None, min_length=1, max_length=36)


class ArmView(BaseModel):
    base_url: str
    model: str
    adapter_id: str | None = None
    prompt_template_id: str | None = None  # None: the active template


class RolloutConfig(BaseModel):
    """Ramp steps for the candidate's share; `evaluate_arms` advances them (experiment.rollout)."""

    model_config = REQUEST_CONFIG

    steps: list[float] = Field(min_length=1, max_length=20)
    min_users_per_step: Integer = Field(100, ge=0)
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
    model_config = REQUEST_CONFIG

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
    model_config = REQUEST_CONFIG

    experiment_id: Text = Field(min_length=1, max_length=64)
    force: bool = False


class RollbackRequest(BaseModel):
    model_config = REQUEST_CONFIG

    experiment_id: Text = Field(min_length=1, max_length=64)
    reason: Text | None = Field(None, max_length=1000)


class ProcessUrlRequest(BaseModel):
    model_config = REQUEST_CONFIG

    url: Text = Field(min_length=1, max_length=2048)


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


class ValidationIssue(BaseModel):
    """One entry of a 422's `detail`: FastAPI's, with `input` and `ctx` cut to a short, JSON-safe excerpt."""

    loc: list[str | int]
    msg: str
    type: str
    input: Any = None
    ctx: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    """Every error: `message` names the problem (413, 422, 429); `detail` is FastAPI's (HTTPException's, 422's list)."""

    message: str | None = None
    detail: str | list[ValidationIssue] | dict[str, Any] | None = None


_ERROR_DESCRIPTIONS = {
    400: "The body is not UTF-8 text, or (process_url) the URL is refused",
    401: "No bearer token in the Authorization header",
    403: "Wrong admin token, or ADMIN_TOKEN is unset (admin endpoints disabled)",
    404: "Unknown id",
    409: "Conflicts with the current state",
    413: "Request body over MAX_BODY_BYTES",
    422: "Invalid input; `message` names each bad field",
    429: "Over this user's rate limit; retry after Retry-After seconds",
    502: "The upstream failed",
    503: "The store is unreachable; retry after Retry-After seconds",
    504: "Every arm timed out",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for these error statuses, each with the ErrorBody model."""
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        responses[code] = {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[code]}
        if code in (429, 503):
            responses[code]["headers"] = _RETRY_AFTER
    return responses
