"""Groundedness of an answer in the passages it was given, by sentence embeddings: cheap, local, no LLM.

Each answer sentence is compared with every passage *sentence* (one claim against one claim keeps
a copied or closely paraphrased sentence near 1.0, where a whole chunk would dilute it); a passage
sentence longer than `_WINDOW_WORDS` words is cut into windows of that size so it fits the model.
The score is the mean over answer sentences of the best cosine, clipped to [0, 1].

Known blind spots: it measures semantic overlap, not entailment (a negated copy still scores high),
and an honest "the context does not say" scores low.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

METHOD_VERSION = 1
_MIN_WORDS = 3
_WINDOW_WORDS = 60
# The chunker's sentence rule (a closing quote or bracket may follow the stop), plus line breaks for lists.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+|\n+")
_CITATION = re.compile(r"\[\d+(?:\s*[,-]\s*\d+)*\]")


class TextEncoder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray: ...


def passages_from_messages(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The passage texts that `store.prompts.render_messages` put into the last user message.

    Passages are rendered as "[1] title\\ntext\\n\\n[2] title\\ntext"; markers are accepted only in
    sequence (1, 2, ...) at a line start, so "[3]" inside a passage does not split it. The last
    passage ends at the first blank line after it (where the default template's "Question:" starts):
    indexed chunks have their whitespace collapsed, so a blank line is never part of one.
    Few-shot turns before the last user message are ignored; "(no passages found)" gives [].
    """
    content = _last_user_text(messages)
    markers: list[re.Match[str]] = []
    while True:
        number = len(markers) + 1
        pattern = rf"(?:^|\n)\[{number}\] " if number == 1 else rf"\n\n\[{number}\] "
        found = re.compile(pattern).search(content, markers[-1].end() if markers else 0)
        if found is None:
            break
        markers.append(found)
    passages = []
    for i, marker in enumerate(markers):
        if i + 1 < len(markers):
            block = content[marker.end() : markers[i + 1].start()]
        else:
            block = content[marker.end() :].split("\n\n", 1)[0]
        title, _, text = block.partition("\n")
        passage = text.strip() or title.strip()
        if passage:
            passages.append(passage)
    return passages


class GroundingScorer:
    """Scores many (answer, passages) pairs with one encode call over all their distinct texts."""

    def __init__(self, embedder: TextEncoder) -> None:
        self.embedder = embedder

    def score_many(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[float, dict[str, Any]]]:
        prepared = [(_answer_sentences(answer or ""), _passage_units(passages)) for answer, passages in items]
        texts = sorted({text for sentences, units in prepared for text in (*sentences, *units)})
        vectors = _unit_rows(self.embedder.encode(texts)) if texts else np.zeros((0, 0), dtype=np.float32)
        row = {text: i for i, text in enumerate(texts)}
        return [_score_one(sentences, units, vectors, row) for sentences, units in prepared]

    def score(self, answer: str, passages: Sequence[str]) -> tuple[float, dict[str, Any]]:
        return self.score_many([(answer, passages)])[0]


def _score_one(sentences: list[str], units: list[str], vectors: np.ndarray,
               row: dict[str, int]) -> tuple[float, dict[str, Any]]:
    if not sentences:
        return 0.0, {"reason": "empty answer", "method_version": METHOD_VERSION}
    if not units:
        return 0.0, {"reason": "no passages", "method_version": METHOD_VERSION}
    answer = vectors[[row[s] for s in sentences]]
    evidence = vectors[[row[u] for u in units]]
    best = np.clip((answer @ evidence.T).max(axis=1), 0.0, 1.0)
    return float(best.mean()), {
        "sentences": len(sentences),
        "passage_units": len(units),
        "min": round(float(best.min()), 4),
        "method_version": METHOD_VERSION,
    }


def _answer_sentences(answer: str) -> list[str]:
    """Sentences without citation markers; fragments under three words are dropped unless nothing else is left."""
    sentences = _sentences(_CITATION.sub("", answer))
    long_enough = [s for s in sentences if len(s.split()) >= _MIN_WORDS]
    return long_enough or sentences


def _passage_units(passages: Sequence[str]) -> list[str]:
    units: list[str] = []
    for passage in passages:
        for sentence in _sentences(passage):
            words = sentence.split()
            units.extend(" ".join(words[i : i + _WINDOW_WORDS]) for i in range(0, len(words), _WINDOW_WORDS))
    return list(dict.fromkeys(units))


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    # The project's Embedder already normalises; a different encoder might not, and cosine needs it.
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts
                return "\n".join(part.get("text", "") for part in content if isinstance(part, Mapping))
            return content if isinstance(content, str) else ""
    return ""
