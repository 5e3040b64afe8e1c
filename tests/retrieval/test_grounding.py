"""Grounding scores: passages parsed back out of the logged prompt, and answers scored against them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from retrieval.grounding import GroundingScorer, passages_from_messages
from store.prompts import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE, render_messages


@dataclass
class _Passage:
    title: str
    text: str


PASSAGES = [
    _Passage("List comprehensions",
             "A list comprehension consists of brackets containing an expression followed by a for clause, then "
             "zero or more for or if clauses. The result will be a new list resulting from evaluating the "
             "expression in the context of the for and if clauses which follow it. List comprehensions provide a "
             "concise way to create lists."),
    _Passage("Built-in Functions: sorted",
             "The sorted() function returns a new sorted list from the items in an iterable. It has two optional "
             "arguments which must be specified as keyword arguments. The key argument specifies a function of one "
             "argument that is used to extract a comparison key from each element."),
    _Passage("The with statement",
             "The with statement is used to wrap the execution of a block with methods defined by a context "
             "manager. This allows common try, except, finally usage patterns to be encapsulated for convenient "
             "reuse."),
]
FEW_SHOT = [{"question": "What is [1] in a list?", "answer": "[1] Indexing.\n\n[2] Slicing."}]


def _messages(passages=PASSAGES, question="How do I build a list in one line?", template=DEFAULT_TEMPLATE):
    return render_messages(DEFAULT_SYSTEM_PROMPT, template, FEW_SHOT, passages, question)


def test_passages_come_back_from_the_rendered_prompt_in_order():
    assert passages_from_messages(_messages()) == [p.text for p in PASSAGES]


def test_parsing_ignores_few_shot_turns_and_handles_no_passages():
    assert passages_from_messages(_messages(passages=[])) == []
    assert passages_from_messages([]) == []
    assert passages_from_messages([{"role": "system", "content": "[1] t\nnot a passage"}]) == []


def test_parsing_is_not_fooled_by_markers_inside_text_or_a_template_with_the_question_last_or_first():
    tricky = [_Passage("Indexing", "a[1] is the second item and [3] is a list literal."), _Passage("Two", "b")]
    assert passages_from_messages(_messages(passages=tricky)) == [tricky[0].text, "b"]
    question_first = "Question: {question}\n\nContext:\n{context}"
    assert passages_from_messages(_messages(template=question_first)) == [p.text for p in PASSAGES]
    # A question that itself looks like a passage marker stays out of the passages.
    assert passages_from_messages(_messages(question="[4] what?")) == [p.text for p in PASSAGES]


def test_parsing_reads_openai_content_parts():
    messages = _messages()
    messages[-1] = {"role": "user", "content": [{"type": "text", "text": messages[-1]["content"]}]}
    assert passages_from_messages(messages) == [p.text for p in PASSAGES]


def test_all_items_are_encoded_in_one_call_without_repeated_texts(hash_embedder):
    passages = [p.text for p in PASSAGES]
    copied = "List comprehensions provide a concise way to create lists."
    results = GroundingScorer(hash_embedder).score_many([(copied, passages), (copied + " Yes.", passages),
                                                         ("", passages), ("Some answer here.", [])])
    assert len(hash_embedder.calls) == 1
    assert len(hash_embedder.calls[0]) == len(set(hash_embedder.calls[0]))
    (exact, detail), (with_fragment, fragment_detail), empty, no_passages = results
    assert exact == pytest.approx(1.0) and detail["sentences"] == 1 and detail["method_version"] == 1
    # "Yes." is under three words: dropped, so it neither helps nor hurts.
    assert with_fragment == pytest.approx(1.0) and fragment_detail["sentences"] == 1
    assert empty == (0.0, {"reason": "empty answer", "method_version": 1})
    assert no_passages == (0.0, {"reason": "no passages", "method_version": 1})
    assert GroundingScorer(hash_embedder).score_many([]) == []


def test_short_answers_keep_at_least_one_sentence(hash_embedder):
    score, detail = GroundingScorer(hash_embedder).score("Yes.", ["Yes. It is."])
    assert score == pytest.approx(1.0) and detail["sentences"] == 1


@pytest.mark.slow
def test_a_grounded_answer_scores_far_above_an_unrelated_one(embedder):
    passages = passages_from_messages(_messages())
    answers = {
        "copied": "List comprehensions provide a concise way to create lists [1]. The sorted() function returns a "
                  "new sorted list from the items in an iterable [2].",
        "paraphrased": "A list comprehension is a short way to build a list: you write an expression followed by a "
                       "for clause inside square brackets. sorted() gives back a new list in sorted order.",
        "unrelated": "The Eiffel Tower was completed in 1889 for the World's Fair in Paris. It is made of wrought "
                     "iron and is about 330 metres tall.",
    }
    results = GroundingScorer(embedder).score_many([(answer, passages) for answer in answers.values()])
    scores = {name: score for name, (score, _) in zip(answers, results, strict=True)}
    # Measured with all-MiniLM-L6-v2: copied 1.00 (citation markers are stripped), paraphrased 0.88, unrelated 0.05.
    assert scores["copied"] > 0.9
    assert scores["paraphrased"] > 0.7
    assert scores["unrelated"] < 0.3
    assert all(0.0 <= s <= 1.0 for s in scores.values())


def test_parsing_needs_a_blank_line_before_every_marker_but_the_first_and_stops_at_the_next_blank_line():
    one = [_Passage("Only", "the one passage")]
    # A question after the passages that looks like a second marker, or runs over a blank line.
    assert passages_from_messages(_messages(passages=one, question="what?\n[2] more")) == ["the one passage"]
    assert passages_from_messages(_messages(passages=one, question="what?\n\nmore")) == ["the one passage"]
    # A question before the passages with a marker of its own; and a template that opens with them.
    question_first = "Question: {question}\n\nContext:\n{context}"
    assert passages_from_messages(_messages(question="a\n\n[2] b", template=question_first)) == [
        p.text for p in PASSAGES
    ]
    context_first = "{context}\n\nQuestion: {question}"
    assert passages_from_messages(_messages(template=context_first)) == [p.text for p in PASSAGES]


def test_content_parts_are_joined_by_line_breaks_and_parts_without_text_add_nothing():
    def user(*parts):
        return [{"role": "user", "content": list(parts)}]

    passage = {"type": "text", "text": "[1] t\npassage one"}
    assert passages_from_messages(user({"type": "text", "text": "Context:"}, passage)) == ["passage one"]
    assert passages_from_messages(user(passage, {"type": "image_url", "image_url": {"url": "x"}})) == ["passage one"]
    assert passages_from_messages([{"role": "user", "content": None}]) == []


class _TableEncoder:
    """Vectors chosen per text, so each cosine is known exactly; it records what it was asked."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str]):
        import numpy as np

        self.calls.append(list(texts))
        return np.array([self.table[t] for t in texts], dtype=np.float32)


def test_the_score_is_the_mean_of_each_answer_sentences_best_cosine_clipped_to_zero():
    table = {
        "First answer sentence here.": [1.0, 0.0, 0.0],
        "Second answer sentence here.": [0.0, 1.0, 0.0],
        "Third answer sentence here.": [0.0, -1.0, 0.0],
        "Fourth answer sentence here.": [0.2, 0.2, 0.0],  # shorter than unit length
        "Negative answer sentence here.": [-1.0, 0.0, 0.0],
        # Not unit length: the scorer normalises (cosine), whatever the encoder returns.
        "Evidence one.": [3.0, 0.0, 0.0],
        "Evidence two.": [0.0, 0.0, 0.5],
        "Evidence three.": [0.0, 0.123456, 0.99235],
    }
    encoder = _TableEncoder(table)
    answer = "First answer sentence here. Second answer sentence here. Third answer sentence here."
    score, detail = GroundingScorer(encoder).score(answer, ["Evidence one. Evidence two.", "Evidence three."])
    # Best cosines: 1 (evidence one), 0.123456/|(0.123456, 0.99235)| = 0.12346... and -0.1235 clipped to 0.
    second = 0.123456 / (0.123456**2 + 0.99235**2) ** 0.5
    assert score == pytest.approx((1.0 + second + 0.0) / 3, abs=1e-6)
    assert detail == {"sentences": 3, "passage_units": 3, "min": 0.0, "method_version": 1}
    two, detail = GroundingScorer(encoder).score(
        "First answer sentence here. Second answer sentence here.", ["Evidence three."]
    )
    assert two == pytest.approx(second / 2, abs=1e-6)
    assert detail["min"] == 0.0 and detail["sentences"] == 2
    _, detail = GroundingScorer(encoder).score("Second answer sentence here.", ["Evidence three."])
    assert detail["min"] == round(second, 4) == 0.1235
    # Cosine, whatever the lengths: (0.2, 0.2, 0) against (3, 0, 0) is 1/sqrt(2).
    diagonal, _ = GroundingScorer(encoder).score("Fourth answer sentence here.", ["Evidence one."])
    assert diagonal == pytest.approx(2**-0.5, abs=1e-6)
    # A sentence pointing away from all the evidence scores 0, not below.
    assert GroundingScorer(encoder).score("Negative answer sentence here.", ["Evidence one."])[0] == 0.0


def test_what_is_encoded_citations_out_short_fragments_dropped_long_sentences_windowed(hash_embedder):
    scorer = GroundingScorer(hash_embedder)
    assert scorer.score_many([]) == [] and hash_embedder.calls == []  # nothing to encode, no call
    long_sentence = " ".join(f"w{i}" for i in range(130))  # windows of 60, 60 and 10 words
    _, detail = scorer.score("Lists use brackets [1]. Three words here. Ok.", [long_sentence])
    (texts,) = hash_embedder.calls
    windows = [" ".join(f"w{i}" for i in range(start, min(start + 60, 130))) for start in (0, 60, 120)]
    assert sorted(texts) == sorted(["Lists use brackets .", "Three words here.", *windows])
    assert detail["sentences"] == 2 and detail["passage_units"] == 3  # "Ok." is under three words
