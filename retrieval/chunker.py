"""Split text into overlapping, paragraph- and sentence-aware chunks for embedding."""

from __future__ import annotations

import re

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_WHITESPACE = re.compile(r"\s+")
# A sentence ends at . ! ? (optionally followed by a closing quote/bracket) and whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


def chunk_text(text: str, *, max_chars: int = 1000, overlap: int = 150) -> list[str]:
    """Pack paragraphs (then sentences, then words) into chunks of at most `max_chars`.

    Each chunk after the first starts with up to `overlap` characters of the previous chunk's
    tail (cut at a word boundary), so a fact that straddles a boundary is retrievable from
    either side. Whitespace inside a chunk is collapsed to single spaces.
    """
    if max_chars <= 0:
        raise ValueError("max_chars must be positive")
    if overlap < 0 or overlap >= max_chars:
        raise ValueError("overlap must be in [0, max_chars)")
    pieces = [p for para in _paragraphs(text) for p in _split_to_fit(para, max_chars - overlap)]
    return _pack(pieces, max_chars, overlap)


def _paragraphs(text: str) -> list[str]:
    paragraphs = (_normalise(p) for p in _PARAGRAPH_BREAK.split(text))
    return [p for p in paragraphs if p]


def _normalise(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _split_to_fit(paragraph: str, limit: int) -> list[str]:
    """Break one paragraph into units no longer than `limit`: sentences, then words, then hard cuts."""
    if len(paragraph) <= limit:
        return [paragraph]
    units: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        sentence = sentence.strip()
        if not sentence:
            continue
        if len(sentence) <= limit:
            units.append(sentence)
        else:
            units.extend(_split_words(sentence, limit))
    return units


def _split_words(sentence: str, limit: int) -> list[str]:
    parts: list[str] = []
    current = ""
    for word in sentence.split(" "):
        # A single word longer than the limit (a URL, a base64 blob) is cut hard.
        while len(word) > limit:
            if current:
                parts.append(current)
                current = ""
            parts.append(word[:limit])
            word = word[limit:]
        if not word:
            continue
        candidate = f"{current} {word}" if current else word
        if len(candidate) <= limit:
            current = candidate
        else:
            parts.append(current)
            current = word
    if current:
        parts.append(current)
    return parts


def _pack(units: list[str], max_chars: int, overlap: int) -> list[str]:
    chunks: list[str] = []
    current = ""
    for unit in units:
        candidate = f"{current} {unit}" if current else unit
        if len(candidate) <= max_chars:
            current = candidate
            continue
        chunks.append(current)
        # Units are at most max_chars - overlap long; shrink the tail by the joining space if needed.
        tail = _tail(current, min(overlap, max_chars - len(unit) - 1))
        current = f"{tail} {unit}" if tail else unit
    if current:
        chunks.append(current)
    return chunks


def _tail(text: str, overlap: int) -> str:
    """The last <= `overlap` characters of `text`, starting at a word boundary when possible."""
    if overlap <= 0:
        return ""
    if len(text) <= overlap:
        return text
    tail = text[-overlap:]
    cut = tail.find(" ")
    # Prefer dropping a partial leading word; keep the hard cut if the tail is one long word.
    if 0 <= cut < len(tail) - 1:
        tail = tail[cut + 1 :]
    return tail.strip()
