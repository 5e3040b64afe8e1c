from __future__ import annotations

import pytest

from retrieval.chunker import chunk_text

PARAGRAPHS = "\n\n".join(
    " ".join(f"Sentence {p}.{s} talks about topic {p} in some detail." for s in range(12)) for p in range(8)
)


@pytest.mark.parametrize(("max_chars", "overlap"), [(1000, 150), (200, 50), (80, 0), (40, 39)])
def test_chunks_respect_bounds_and_are_never_empty(max_chars: int, overlap: int) -> None:
    chunks = chunk_text(PARAGRAPHS, max_chars=max_chars, overlap=overlap)
    assert len(chunks) > 1
    for chunk in chunks:
        assert 0 < len(chunk) <= max_chars
        assert chunk == chunk.strip()
        assert "  " not in chunk and "\n" not in chunk


def test_consecutive_chunks_overlap() -> None:
    chunks = chunk_text(PARAGRAPHS, max_chars=300, overlap=80)
    for previous, current in zip(chunks, chunks[1:], strict=False):
        # The next chunk opens with a word-aligned piece (<= overlap chars) of the previous one's tail.
        shared = _longest_suffix_prefix(previous, current)
        assert 10 <= shared <= 80
        assert current[shared] == " " and previous[-shared - 1] == " "


def test_no_overlap_means_chunks_concatenate_to_the_text() -> None:
    chunks = chunk_text(PARAGRAPHS, max_chars=250, overlap=0)
    assert " ".join(chunks) == " ".join(PARAGRAPHS.split())


def test_every_word_survives() -> None:
    words = set(PARAGRAPHS.split())
    chunked = {word for chunk in chunk_text(PARAGRAPHS, max_chars=120, overlap=30) for word in chunk.split()}
    assert words == chunked


def test_short_and_empty_text() -> None:
    assert chunk_text("  hello \n\n  world\t ") == ["hello world"]
    assert chunk_text("") == []
    assert chunk_text(" \n\n \t") == []


def test_long_word_is_cut_hard() -> None:
    chunks = chunk_text("x" * 250, max_chars=100, overlap=10)
    assert all(0 < len(c) <= 100 for c in chunks)
    assert "".join(chunks).count("x") >= 250


def test_exact_chunks_of_a_small_text() -> None:
    # Worked by hand: paragraphs over max_chars - overlap (28) split into sentences; each new chunk
    # opens with the previous chunk's last whole words of at most `overlap` (12) characters.
    text = "Alpha beta gamma. Delta epsilon.\n\nZeta eta theta iota. Kappa lambda mu."
    assert chunk_text(text, max_chars=40, overlap=0) == [
        "Alpha beta gamma. Delta epsilon.", "Zeta eta theta iota. Kappa lambda mu."]
    assert chunk_text(text, max_chars=40, overlap=12) == [
        "Alpha beta gamma. Delta epsilon.", "epsilon. Zeta eta theta iota.", "theta iota. Kappa lambda mu."]


def test_paragraphs_are_kept_together_when_they_fit() -> None:
    text = "First paragraph is here.\n\nSecond paragraph is here."
    assert chunk_text(text, max_chars=30, overlap=0) == ["First paragraph is here.", "Second paragraph is here."]


@pytest.mark.parametrize(("max_chars", "overlap"), [(0, 0), (100, 100), (100, -1)])
def test_bad_arguments(max_chars: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        chunk_text("text", max_chars=max_chars, overlap=overlap)


def _longest_suffix_prefix(a: str, b: str) -> int:
    for size in range(min(len(a), len(b)), 0, -1):
        if a.endswith(b[:size]):
            return size
    return 0
