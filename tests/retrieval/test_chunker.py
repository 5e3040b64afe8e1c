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


@pytest.mark.parametrize(
    ("max_chars", "overlap", "message"),
    [(0, 0, "max_chars must be positive"), (-5, 0, "max_chars must be positive"),
     (100, 100, "overlap must be in"), (100, 101, "overlap must be in"), (100, -1, "overlap must be in")],
)  # fmt: skip
def test_bad_arguments(max_chars: int, overlap: int, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^{message}( \[0, max_chars\))?$"):
        chunk_text("text", max_chars=max_chars, overlap=overlap)


def test_the_smallest_chunks_are_single_characters_and_words() -> None:
    assert chunk_text("a b", max_chars=1, overlap=0) == ["a", "b"]
    assert chunk_text("ab", max_chars=1, overlap=0) == ["a", "b"]


def test_a_chunk_may_be_exactly_max_chars_long() -> None:
    text = "Alpha beta gamma. Delta epsilon."  # 32 characters
    assert chunk_text(text, max_chars=32, overlap=0) == [text]
    assert chunk_text(text, max_chars=31, overlap=0) == ["Alpha beta gamma.", "Delta epsilon."]


def test_a_sentence_too_long_for_a_chunk_is_split_between_words() -> None:
    # No sentence end: the words are packed greedily into pieces of at most 12 characters.
    assert chunk_text("one two three four five six", max_chars=12, overlap=0) == [
        "one two", "three four", "five six"]  # fmt: skip


@pytest.mark.parametrize(
    ("word", "pieces"), [("x" * 10, ["xxxx", "xxxx", "xx"]), ("x" * 8, ["xxxx", "xxxx"])]
)
def test_a_long_word_between_short_ones_is_cut_and_nothing_around_it_is_lost(word: str, pieces: list[str]) -> None:
    assert chunk_text(f"ab {word} cd", max_chars=4, overlap=0) == ["ab", *pieces, "cd"]


def test_the_overlap_leaves_room_for_the_joining_space() -> None:
    # The second unit is 14 = max_chars - overlap long: its chunk holds 20 - 14 - 1 = 5 characters
    # of the first one's tail, "abcde" whole, not the 6 the overlap alone allows.
    text = "xxxxxxxx abcde\n\nyyyyyyy zzzzzz"
    assert chunk_text(text, max_chars=20, overlap=6) == ["xxxxxxxx abcde", "abcde yyyyyyy zzzzzz"]


def test_the_tail_drops_a_partial_leading_word_and_may_be_one_character() -> None:
    # The 6-character tail is "abcd e": its leading "abcd" is the end of a longer word, so only "e" opens
    # the next chunk; with an overlap of 1 the one character is kept though it is part of a word.
    assert chunk_text("qqqqqqqqabcd e\n\nrrrrrrrrrrrrr", max_chars=20, overlap=6) == [
        "qqqqqqqqabcd e", "e rrrrrrrrrrrrr"]  # fmt: skip
    assert chunk_text("ab cd\n\nef gh", max_chars=7, overlap=1) == ["ab cd", "d ef gh"]


def _longest_suffix_prefix(a: str, b: str) -> int:
    for size in range(min(len(a), len(b)), 0, -1):
        if a.endswith(b[:size]):
            return size
    return 0
