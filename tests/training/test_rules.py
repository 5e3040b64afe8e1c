"""Rules from hand-made corrections: what each correction changed, and what enough of them propose."""

from __future__ import annotations

from store.prompts import apply_output_rules
from store.rules import Correction
from training.rules import LINE, PREFIX, REMOVED, Observation, observe, propose_rules


def _messages(*titles: str) -> list[dict]:
    context = "\n\n".join(f"[{n}] {title}\n{title} are explained here." for n, title in enumerate(titles, start=1))
    return [{"role": "system", "content": "You are a search assistant."},
            {"role": "user", "content": f"Context:\n{context}\n\nQuestion: how?"}]


def _correction(n: int, answer: str, corrected: str, *titles: str, user_id: str = "u") -> Correction:
    return Correction(f"f{n}", f"e{n}", answer, corrected, _messages(*(titles or ("Lists",))), user_id)


def test_a_house_style_rewrite_is_a_prefix_and_a_citation_line() -> None:
    found = observe("You can call sort() on it.", "Answer: Lists are mutable.\nSource: Lists", _messages("Lists"))
    # A rewrite keeps under half of the words: it says nothing about any one removed phrase.
    assert found == {Observation(PREFIX, "Answer:"), Observation(LINE, "Source: {title}")}


def test_a_removed_phrase_is_seen_when_the_rest_is_kept() -> None:
    found = observe("As an AI language model, I think sort() sorts in place.",
                    "Answer: I think sort() sorts in place.", _messages("Lists"))
    assert found == {Observation(PREFIX, "Answer:"), Observation(REMOVED, "As an AI language model,")}


def test_lines_that_are_not_passage_titles_stay_literal_and_present_ones_are_ignored() -> None:
    found = observe("Use sorted().\nSource: Lists", "Use sorted().\nSource: Lists\nSee also: the tutorial",
                    _messages("Lists"))
    assert found == {Observation(LINE, "See also: the tutorial")}
    assert observe("Answer: fine", "Answer: fine", _messages()) == set()


def test_personal_data_is_never_proposed() -> None:
    found = observe("Mail bob@example.com for help. Use sorted().", "Use sorted().", _messages("Lists"))
    assert found == set()


def test_proposals_need_support_and_group_across_titles_and_case() -> None:
    corrections = [
        _correction(1, "As an AI, use sort().", "Answer: use sort().\nSource: Lists", "Lists", user_id="sim-1"),
        _correction(2, "as an AI, call sorted() on tuples.", "Answer: call sorted() on tuples.\nSource: Tuples",
                    "Tuples", "Lists"),
        _correction(3, "Dicts keep order.", "Dicts keep insertion order.", "Dicts"),  # a one-off edit
    ]
    proposals = {(p.kind, p.text): p for p in propose_rules(corrections, min_support=2)}
    assert set(proposals) == {
        ("instruction", 'Begin every answer with "Answer:".'),
        ("required_format", "Answer: {answer}"),
        ("instruction", 'End every answer with a line "Source: <title of the passage the answer comes from>".'),
        ("required_format", "{answer}\nSource: {title}"),
        ("instruction", 'Never write "As an AI,".'),
        ("banned_phrase", "As an AI,"),
    }
    banned = proposals[("banned_phrase", "As an AI,")]
    assert (banned.feedback_ids, banned.simulated) == (["f1", "f2"], 1)
    assert propose_rules(corrections, min_support=3) == []


def test_approved_output_rules_turn_a_new_answer_into_the_corrected_style() -> None:
    corrections = [_correction(n, f"As an AI, answer {n}.", f"Answer: answer {n}.\nSource: Lists", "Lists")
                   for n in range(3)]
    outputs = [{"kind": p.kind, "text": p.text} for p in propose_rules(corrections) if p.kind != "instruction"]
    assert apply_output_rules("As an AI, tuples are immutable.", outputs, ["Tuples"]) == (
        "Answer: tuples are immutable.\nSource: Tuples")


def test_an_answer_that_already_opens_with_the_label_after_spaces_gets_no_prefix() -> None:
    assert observe("  Answer: use sorted().", "Answer: use sorted().", _messages()) == set()


def test_values_with_a_brace_are_never_proposed_as_lines() -> None:
    for value in ("use {x", "use x}", "use {x}"):  # a brace would read as the output rule's placeholder
        assert observe("Use sorted().", f"Use sorted().\nSee also: {value}", _messages()) == set()


def test_the_edges_of_what_a_removal_may_be() -> None:
    # Half of the words kept exactly (the lower bound is inclusive): the removed phrase is seen.
    assert observe("Well, to be honest, sorted() works", "sorted() works", _messages()) == {
        Observation(REMOVED, "Well, to be honest,")}
    # Twelve words at most, wherever in the answer they are: twelve deleted late in a long answer count,
    # thirteen do not.
    kept = " ".join(f"k{n}" for n in range(30))
    twelve, thirteen = " ".join(f"d{n}" for n in range(12)), " ".join(f"d{n}" for n in range(13))
    assert observe(f"{kept} {twelve}", kept, _messages()) == {Observation(REMOVED, twelve)}
    assert observe(f"{kept} {thirteen}", kept, _messages()) == set()
    # Lines added on the lines after the first are joined with spaces, so their words are kept words.
    assert observe("one two three four extra", "one two\nthree four", _messages()) == {Observation(REMOVED, "extra")}


def test_observations_up_to_300_characters() -> None:
    for length, seen in ((300, True), (301, False)):
        value = "v" * (length - len("See also: "))
        found = observe("Use sorted().", f"Use sorted().\nSee also: {value}", _messages())
        assert (found == {Observation(LINE, f"See also: {value}")}) is seen


def test_a_proposal_as_the_flow_reports_it() -> None:
    from training.rules import Proposal

    proposal = Proposal("banned_phrase", "Sure!", ["f1", "f2", "f3"], simulated=2)
    assert proposal.to_dict() == {"kind": "banned_phrase", "text": "Sure!", "support": 3, "simulated": 2,
                                  "feedback_ids": ["f1", "f2", "f3"]}  # fmt: skip


def test_proposals_by_default_need_two_corrections_and_come_best_supported_first() -> None:
    corrections = [
        # First seen, with one supporter only: it is skipped, and the others are still looked at.
        _correction(1, "Use sorted().", "Use sorted().\nSee also: Tutorial"),
        _correction(2, "Use sorted().", "Use sorted().\nSee also: tutorial"),  # another line: case matters here
        _correction(3, "as an ai, use sorted().", "use sorted()."),
        _correction(4, "As an AI, use sorted().", "use sorted()."),
        _correction(5, "As an AI, use sorted().", "use sorted().\nNote: stable"),
        _correction(6, "Use sorted().", "Use sorted().\nNote: stable"),
    ]
    proposals = propose_rules(corrections)
    assert [(p.kind, p.text, len(p.feedback_ids)) for p in proposals] == [
        ("banned_phrase", "As an AI,", 3),  # the spelling most corrections removed, though another came first
        ("instruction", 'Never write "As an AI,".', 3),
        ("instruction", 'End every answer with the line "Note: stable".', 2),
        ("required_format", "{answer}\nNote: stable", 2),
    ]
