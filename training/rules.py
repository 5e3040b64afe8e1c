"""Rules from corrections: what users keep changing in the model's answers, proposed as data.

Each correction is compared with the answer it replaced, word by word (difflib), and reduced to
observations of three shapes:

* **prefix**: the correction opens with a label ("Answer:") that the answer did not open with;
* **line**: the correction adds a "Label: value" line after its first; a value that is the title
  of a retrieved passage becomes "{title}", so "Source: Lists" and "Source: Tuples" are one
  observation;
* **removed**: a short phrase the correction deletes from an answer it otherwise keeps (at least
  half of the words in common: a rewrite says nothing about any one phrase of the old answer).

An observation made by at least `min_support` corrections becomes two proposals: an `instruction`
(a sentence for the system prompt, which asks the model) and the output rule that enforces it
(`required_format` or `banned_phrase`, applied to answers by `store.prompts.apply_output_rules`).
The operator approves either, both or neither. Text that redaction would change (an e-mail
address, a key) is never proposed: approved rules reach every user's prompt.

Simulated users' corrections count, as they do in the training dataset (training.dataset keeps
and marks them); each proposal says how many of its supporters were simulated.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from store.prompts import BANNED_PHRASE, REQUIRED_FORMAT
from store.rules import INSTRUCTION, Correction
from training.dataset import SIMULATED_USER_PREFIX, _last_user_content
from training.redact import redact_text

PREFIX, LINE, REMOVED = "prefix", "line", "removed"
# "Answer:", "Source:", "See also:": a capitalised label of up to three words, then a colon.
_LABEL = r"([A-Z][A-Za-z]*(?: [A-Za-z]+){0,2}):"
_OPENING_LABEL = re.compile(rf"^\s*{_LABEL}(?:\s|$)")
_LABELLED_LINE = re.compile(rf"^\s*{_LABEL}\s*(\S.*?)\s*$")
_PASSAGE_TITLE = re.compile(r"^\[\d+\] (.+)$", re.MULTILINE)  # store.prompts.render_messages' layout
_MIN_KEPT = 0.5
_MAX_PHRASE_WORDS = 12
_MAX_TEXT = 300


@dataclass(frozen=True)
class Observation:
    shape: str  # prefix | line | removed
    text: str  # "Answer:" | "Source: {title}" | "As an AI language model,"


@dataclass
class Proposal:
    kind: str
    text: str
    feedback_ids: list[str]
    simulated: int = 0  # how many of the supporting corrections came from simulated users

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "text": self.text, "support": len(self.feedback_ids),
                "simulated": self.simulated, "feedback_ids": self.feedback_ids}


def observe(answer: str, corrected: str, messages: Sequence[dict[str, Any]] = ()) -> set[Observation]:
    """What one correction changed, in the three shapes above."""
    found: set[Observation] = set()
    first, *rest = corrected.strip().split("\n")
    opening = _OPENING_LABEL.match(first)
    if opening and not answer.lstrip().startswith(opening.group(1) + ":"):
        found.add(Observation(PREFIX, opening.group(1) + ":"))
        first = first[opening.end():]

    answer_lines = {_squash(line) for line in answer.split("\n")}
    titles = {_squash(title) for title in _PASSAGE_TITLE.findall(_last_user_content(list(messages)))}
    body = [first]
    for line in rest:
        labelled = _LABELLED_LINE.match(line)
        if labelled is None or _squash(line) in answer_lines:
            body.append(line)
            continue
        label, value = labelled.groups()
        if _squash(value) in titles:
            found.add(Observation(LINE, f"{label}: {{title}}"))
        elif "{" not in value and "}" not in value:  # braces would read as a format's placeholders
            found.add(Observation(LINE, f"{label}: {value}"))

    # What the correction deleted from the rest, once the prefix and the added lines are set aside.
    said, kept = answer.split(), " ".join(body).split()
    matcher = difflib.SequenceMatcher(None, said, kept, autojunk=False)
    if said and matcher.ratio() >= _MIN_KEPT:
        for op, i1, i2, _j1, _j2 in matcher.get_opcodes():
            if op == "delete" and i2 - i1 <= _MAX_PHRASE_WORDS:
                found.add(Observation(REMOVED, " ".join(said[i1:i2])))
    return {o for o in found if len(o.text) <= _MAX_TEXT and redact_text(o.text) == o.text}


def propose_rules(corrections: Iterable[Correction], min_support: int = 2) -> list[Proposal]:
    """Proposals for every observation that at least `min_support` corrections share, best supported first."""
    supporters: dict[tuple[str, str], list[Correction]] = defaultdict(list)
    spellings: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for correction in corrections:
        for observation in observe(correction.answer, correction.corrected, correction.messages):
            # Removed phrases group regardless of case (removal ignores case too).
            key = (observation.shape, observation.text.lower() if observation.shape == REMOVED else observation.text)
            supporters[key].append(correction)
            spellings[key][observation.text] += 1

    proposals: list[Proposal] = []
    for key, group in supporters.items():
        ids = sorted({c.feedback_id for c in group})
        if len(ids) < min_support:
            continue
        simulated = len({c.feedback_id for c in group if (c.user_id or "").startswith(SIMULATED_USER_PREFIX)})
        text = spellings[key].most_common(1)[0][0]
        proposals += [Proposal(kind, rule_text, ids, simulated) for kind, rule_text in _rules_for(key[0], text)]
    return sorted(proposals, key=lambda p: (-len(p.feedback_ids), p.kind, p.text))


def _rules_for(shape: str, text: str) -> list[tuple[str, str]]:
    """The instruction that asks for the change, and the output rule that makes it."""
    if shape == PREFIX:
        return [(INSTRUCTION, f'Begin every answer with "{text}".'), (REQUIRED_FORMAT, f"{text} {{answer}}")]
    if shape == LINE:
        label, _, value = text.partition(": ")
        wanted = (f'a line "{label}: <title of the passage the answer comes from>"' if value == "{title}"
                  else f'the line "{text}"')
        return [(INSTRUCTION, f"End every answer with {wanted}."), (REQUIRED_FORMAT, f"{{answer}}\n{text}")]
    return [(INSTRUCTION, f'Never write "{text}".'), (BANNED_PHRASE, text)]


def _squash(text: str) -> str:
    return " ".join(text.split()).lower()
