"""Synthetic question/answer rows for index chunks that real traffic rarely retrieves.

Real logs only cover what users happened to ask. For chunks that retrieval seldom returns, an
OpenAI-compatible LLM writes questions and answers grounded in the chunk. Generated pairs are kept
only if the answer is supported by the chunk (embedding similarity) and the question duplicates
neither a real question nor another synthetic one. Kept rows use the same chat messages the proxy
would send for that question, so they train the model on the prompts it will really see.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from store.prompts import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE, find_active, render_messages
from training import Encoder
from training.select import greedy_dedupe

if TYPE_CHECKING:
    import httpx

    from store.db import Database

log = logging.getLogger(__name__)

_GENERATION_SYSTEM = (
    "You write training data for a search assistant. Given a passage, you write questions a user "
    "might ask that the passage answers, each with a concise answer that uses only facts stated in "
    "the passage."
)


class ChunkLike(Protocol):
    id: str
    title: str
    source: str
    text: str


@dataclass(frozen=True)
class SyntheticConfig:
    base_url: str  # OpenAI-compatible, e.g. http://127.0.0.1:8001/v1
    model: str
    api_key: str | None = field(default=None, repr=False)
    index_dir: Path | None = None  # default: Settings().index_dir
    max_chunks: int = 20
    questions_per_chunk: int = 2
    max_retrievals: int = 0  # a chunk retrieved at most this often counts as rarely retrieved
    min_support: float = 0.5  # cosine(answer, chunk) needed to call the answer grounded
    duplicate_threshold: float = 0.9  # cosine(question, any kept question) that makes it a duplicate
    temperature: float = 0.7
    max_tokens: int = 512
    timeout_s: float = 60.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("api_key")
        data["index_dir"] = str(self.index_dir) if self.index_dir else None
        return data


@dataclass(frozen=True)
class SyntheticExample:
    prompt: list[dict[str, Any]]  # the chat messages the proxy would send
    question: str
    answer: str
    chunk_id: str
    support: float


@dataclass
class SyntheticResult:
    examples: list[SyntheticExample]
    counts: Counter[str]


@dataclass(frozen=True)
class PromptLayout:
    """The active prompt template: how the proxy turns passages and a question into messages."""

    system_prompt: str
    template: str
    few_shot: list[dict[str, Any]] = field(default_factory=list)
    template_id: str | None = None
    version: int | None = None

    def messages(self, chunks: Sequence[ChunkLike], question: str) -> list[dict[str, Any]]:
        """The chat messages for `question` over `chunks`, laid out exactly as the proxy lays them out."""
        return render_messages(self.system_prompt, self.template, self.few_shot, chunks, question)


def active_layout(db: Database) -> PromptLayout:
    """The active prompt template (the store's defaults if none exists yet), without creating one."""
    row = find_active(db)
    if row is None:
        return PromptLayout(DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE)
    return PromptLayout(row.system_prompt, row.template, list(row.few_shot or []), row.id, row.version)


def load_chunks(index_dir: Path) -> list[ChunkLike]:
    from retrieval.index import IndexStore

    return list(IndexStore(index_dir).load().chunks)


def rarely_retrieved(
    chunks: Sequence[ChunkLike], retrieval_counts: Counter[str], config: SyntheticConfig
) -> list[ChunkLike]:
    """Up to `max_chunks` chunks retrieved at most `max_retrievals` times, least retrieved first.

    Ties are broken by a seeded hash rather than by id, so successive runs with new seeds cover
    different parts of a large index.
    """
    rare = [c for c in chunks if retrieval_counts.get(c.id, 0) <= config.max_retrievals and c.text.strip()]
    rare.sort(key=lambda c: (retrieval_counts.get(c.id, 0), _seeded_hash(config.seed, c.id)))
    return rare[: config.max_chunks]


def generate_synthetic(
    chunks: Sequence[ChunkLike],
    *,
    config: SyntheticConfig,
    encoder: Encoder,
    real_questions: Sequence[str],
    layout: PromptLayout,
    style_examples: Sequence[str] = (),
) -> SyntheticResult:
    """Ask the LLM for QA pairs about each chunk and keep the grounded, novel ones."""
    import httpx

    counts: Counter[str] = Counter(chunks=len(chunks))
    candidates: list[tuple[ChunkLike, str, str]] = []
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    with httpx.Client(
        base_url=config.base_url.rstrip("/") + "/",
        headers=headers,
        timeout=config.timeout_s,
    ) as client:
        for chunk in chunks:
            try:
                content = _ask(client, config, chunk, style_examples)
            except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
                log.warning("synthetic QA request for chunk %s failed: %s", chunk.id, exc)
                counts["llm_errors"] += 1
                continue
            pairs = parse_pairs(content)
            if not pairs:
                counts["unparseable"] += 1
            for question, answer in pairs[: config.questions_per_chunk]:
                candidates.append((chunk, question, answer))
    counts["generated"] = len(candidates)
    examples = _filter(candidates, config, encoder, real_questions, layout, counts)
    counts["kept"] = len(examples)
    return SyntheticResult(examples=examples, counts=counts)


def parse_pairs(content: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from a model reply: a JSON list (or {"pairs": [...]}) or Q:/A: lines."""
    pairs = _parse_json_pairs(content)
    if pairs:
        return pairs
    found = re.findall(
        r"(?ims)^\s*Q(?:uestion)?\s*\d*\s*[:.]\s*(.+?)\s*^\s*A(?:nswer)?\s*\d*\s*[:.]\s*(.+?)\s*$", content
    )
    return [(q.strip(), a.strip()) for q, a in found if q.strip() and a.strip()]


def _ask(client: httpx.Client, config: SyntheticConfig, chunk: ChunkLike, style_examples: Sequence[str]) -> str:
    style = ""
    if style_examples:
        shown = "\n---\n".join(style_examples[:3])
        style = f"\n\nWrite every answer in the same style as these answers users preferred:\n{shown}"
    request = (
        f"Passage title: {chunk.title}\n\nPassage:\n{chunk.text}\n\n"
        f"Write {config.questions_per_chunk} different questions that this passage answers, each with "
        f"its answer.{style}\n\n"
        'Reply with JSON only: [{"question": "...", "answer": "..."}]'
    )
    response = client.post(
        "chat/completions",
        json={
            "model": config.model,
            "messages": [
                {"role": "system", "content": _GENERATION_SYSTEM},
                {"role": "user", "content": request},
            ],
            "temperature": config.temperature,
            "max_tokens": config.max_tokens,
            "seed": config.seed,
        },
    )
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"] or "")


def _parse_json_pairs(content: str) -> list[tuple[str, str]]:
    start, end = content.find("["), content.rfind("]")
    candidates = [content.strip()]
    if 0 <= start < end:
        candidates.append(content[start : end + 1])
    for text in candidates:
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if isinstance(data, dict):
            data = data.get("pairs") or data.get("questions") or []
        if isinstance(data, list):
            return [
                (item["question"].strip(), item["answer"].strip())
                for item in data
                if isinstance(item, dict)
                and isinstance(item.get("question"), str)
                and isinstance(item.get("answer"), str)
                and item["question"].strip()
                and item["answer"].strip()
            ]
    return []


def _filter(
    candidates: list[tuple[ChunkLike, str, str]],
    config: SyntheticConfig,
    encoder: Encoder,
    real_questions: Sequence[str],
    layout: PromptLayout,
    counts: Counter[str],
) -> list[SyntheticExample]:
    if not candidates:
        return []
    answers = encoder.encode([answer for _, _, answer in candidates])
    chunk_texts = encoder.encode([chunk.text for chunk, _, _ in candidates])
    support = np.einsum("ij,ij->i", answers, chunk_texts)
    grounded = [i for i in range(len(candidates)) if support[i] >= config.min_support]
    counts["dropped_unsupported"] = len(candidates) - len(grounded)

    questions = encoder.encode([candidates[i][1] for i in grounded])
    real = encoder.encode(list(real_questions)) if real_questions else None
    novel = [grounded[j] for j in greedy_dedupe(questions, config.duplicate_threshold, against=real)]
    counts["dropped_duplicate"] = len(grounded) - len(novel)

    return [
        SyntheticExample(
            prompt=layout.messages([chunk], question),
            question=question,
            answer=answer,
            chunk_id=chunk.id,
            support=round(float(support[i]), 4),
        )
        for i in novel
        for chunk, question, answer in [candidates[i]]
    ]


def count_retrievals(retrieved: Iterable[dict[str, Any] | None]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for item in retrieved:
        counts.update((item or {}).get("ids") or [])
    return counts


def _seeded_hash(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()
