"""Title, tags and category for a document, from any OpenAI-compatible chat endpoint.

Optional (METADATA_API_BASE): a document whose metadata cannot be had is still indexed, only
without it. The endpoint is the operator's own configuration, not user input, so it is called
directly (URL ingestion's SSRF checks guard user-given URLs). The calls are retrieval.chat's, which keeps
the API key out of error messages and reprs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from retrieval.chat import RAW_CHARS, ChatClient, ChatError
from retrieval.corpus import Document

# ok: metadata extracted; invalid: the endpoint answered, but not with usable metadata;
# error: the call failed (transport, timeout, HTTP error status).
Outcome = Literal["ok", "invalid", "error"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "invalid", "error")

MAX_TAGS = 8
_MAX_TAG_CHARS = 50
_SYSTEM = (
    "You label documents for a search index. Reply with one JSON object and nothing else, of the form "
    '{"title": "a short descriptive title", "tags": ["up to 8 short lowercase keywords"], '
    '"category": "one broad topic, e.g. programming, science, cooking"}.'
)
# The gist of a document is near its top; the bound keeps the prompt (and its cost) small.
_MAX_TEXT_CHARS = 4000
_MAX_TOKENS = 200
# An endpoint that failed this many calls in a row is down: the rest of a batch is skipped
# instead of waiting a full timeout per document.
_MAX_CONSECUTIVE_ERRORS = 5


class DocumentMetadata(BaseModel):
    """What the model must answer; extra keys are ignored, tags are normalised."""

    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=True)

    title: str = Field(min_length=1, max_length=200)
    tags: tuple[str, ...] = ()
    category: str | None = Field(None, max_length=80)

    @field_validator("tags")
    @classmethod
    def _normalised_tags(cls, tags: tuple[str, ...]) -> tuple[str, ...]:
        """Lowercase, no duplicates, at most MAX_TAGS; blanks and sentences posing as tags are dropped."""
        kept: list[str] = []
        for tag in (t.strip().lower() for t in tags):
            if tag and len(tag) <= _MAX_TAG_CHARS and tag not in kept:
                kept.append(tag)
        return tuple(kept[:MAX_TAGS])

    @field_validator("category")
    @classmethod
    def _blank_is_none(cls, category: str | None) -> str | None:
        return category or None


class MetadataError(RuntimeError):
    """No metadata for a document; `outcome` says whether the answer was bad or the call failed."""

    def __init__(self, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome

    def __reduce__(self) -> tuple[type[MetadataError], tuple[Outcome, str]]:
        # Pickled with the outcome (Prefect may pickle task results); the default keeps only the message.
        return type(self), (self.outcome, str(self))


@dataclass(frozen=True)
class Extraction:
    """Metadata by document source, and why the others have none (they are indexed without it)."""

    metadata: dict[str, DocumentMetadata]
    failures: dict[str, MetadataError]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(OUTCOMES, 0)
        counts["ok"] = len(self.metadata)
        for failure in self.failures.values():
            counts[failure.outcome] += 1
        return counts


class MetadataExtractor(ChatClient):
    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, model, api_key, timeout_s, transport)
        self._lock = threading.Lock()
        self._consecutive_errors = 0

    def extract(self, title: str, text: str, source: str = "") -> DocumentMetadata:
        """The document's metadata; raises MetadataError when the endpoint gives none."""
        return _parse(self._complete(_prompt(title, text, source)))

    def extract_all(self, documents: Sequence[Document], max_workers: int = 4) -> Extraction:
        """Metadata for each document (a few calls in flight); a failure only costs that document its metadata.

        Failures come back in the Extraction, for the caller to count and log.
        """
        with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="metadata") as pool:
            results = list(pool.map(self._extract_or_failure, documents))
        metadata: dict[str, DocumentMetadata] = {}
        failures: dict[str, MetadataError] = {}
        for document, result in zip(documents, results, strict=True):
            if isinstance(result, MetadataError):
                failures[document.source] = result
            else:
                metadata[document.source] = result
        return Extraction(metadata, failures)

    def _extract_or_failure(self, document: Document) -> DocumentMetadata | MetadataError:
        with self._lock:
            if self._consecutive_errors >= _MAX_CONSECUTIVE_ERRORS:
                return MetadataError("error", f"skipped: {self.url} failed {self._consecutive_errors} calls in a row")
        try:
            result = self.extract(document.title, document.text, document.source)
        except MetadataError as error:
            with self._lock:
                self._consecutive_errors = self._consecutive_errors + 1 if error.outcome == "error" else 0
            return error
        with self._lock:
            self._consecutive_errors = 0
        return result

    def _complete(self, prompt: str) -> str:
        try:
            return self.complete(_SYSTEM, prompt, _MAX_TOKENS)
        except ChatError as error:
            raise MetadataError(error.failure, str(error)) from None


def extract_documents(documents: Sequence[Document], base_url: str, model: str, api_key: str | None = None,
                      timeout_s: float = 30.0) -> Extraction:
    """Metadata for every document from one endpoint (the `ingest` flow and `abloop index build`)."""
    with MetadataExtractor(base_url, model, api_key, timeout_s) as extractor:
        return extractor.extract_all(documents)


def _prompt(title: str, text: str, source: str) -> str:
    return f"Source: {source}\nTitle: {title}\n\nDocument:\n{text[:_MAX_TEXT_CHARS]}\n\nJSON:"


def _parse(reply: str) -> DocumentMetadata:
    """The JSON object in the reply, validated; code fences and chatter around it are tolerated."""
    start, end = reply.find("{"), reply.rfind("}")
    if start < 0 or end < start:
        raise MetadataError("invalid", f"no JSON object in the answer: {reply[:RAW_CHARS]!r}")
    try:
        return DocumentMetadata.model_validate_json(reply[start : end + 1])
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in error.errors()[:3])
        raise MetadataError("invalid", f"unusable metadata ({problems}): {reply[:RAW_CHARS]!r}") from None
