"""An LLM judge over any OpenAI-compatible endpoint: one 1-5 grade per answer, mapped to [0, 1].

Optional beside the embedding grounding score: it costs a request per answer but also sees whether
the question was answered. The calls are retrieval.chat's, which keeps the API key out of error messages
and reprs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from retrieval.chat import RAW_CHARS, ChatClient, ChatError

_SYSTEM = "You grade answers from a search assistant. Reply with a single integer from 1 to 5 and nothing else."
_RUBRIC = (
    "Grade how well the answer is supported by the passages and answers the question.\n"
    "5 = fully supported by the passages and answers the question\n"
    "4 = answers the question; minor details not in the passages\n"
    "3 = partly supported, or only partly answers the question\n"
    "2 = mostly unsupported by the passages, or mostly off the question\n"
    "1 = contradicts or ignores the passages, or does not answer the question"
)
# Bounds the judge's prompt: the grade needs the gist, and logged texts can be long.
_MAX_PASSAGE_CHARS = 2000
_MAX_TEXT_CHARS = 4000
_MAX_TOKENS = 8
_INTEGER = re.compile(r"\d+")
_SCALE = re.compile(r"\b1\s*(?:-|–|to)\s*5\b")  # "Grade (1-5): 4" repeats the scale before its grade


class JudgeError(RuntimeError):
    """The judge could not grade an answer: transport failure, HTTP error, or an unreadable reply."""


class LLMJudge(ChatClient):
    def score(self, question: str, answer: str, passages: Sequence[str]) -> tuple[float, dict[str, Any]]:
        """(grade - 1) / 4 and {"raw", "model", "grade"}; raises JudgeError when no grade comes back."""
        reply = self._complete(_prompt(question, answer, passages))
        grade = _first_grade(reply)
        if grade is None:
            raise JudgeError(f"judge {self.model!r} gave no grade 1-5: {reply[:RAW_CHARS]!r}")
        return (grade - 1) / 4, {"raw": reply[:RAW_CHARS], "model": self.model, "grade": grade}

    def _complete(self, prompt: str) -> str:
        try:
            return self.complete(_SYSTEM, prompt, _MAX_TOKENS)
        except ChatError as error:
            raise JudgeError(f"judge: {error}") from None


def _prompt(question: str, answer: str, passages: Sequence[str]) -> str:
    context = "\n\n".join(f"[{n}] {p[:_MAX_PASSAGE_CHARS]}" for n, p in enumerate(passages, start=1))
    return (f"{_RUBRIC}\n\nPassages:\n{context or '(none)'}\n\nQuestion: {question[:_MAX_TEXT_CHARS]}\n\n"
            f"Answer: {answer[:_MAX_TEXT_CHARS]}\n\nGrade (1-5):")


def _first_grade(reply: str) -> int | None:
    """The first integer in the reply that is a valid grade ("Grade: 4/5" -> 4; "10" is skipped), the scale
    "1-5" / "1 to 5" not counting as one (a judge echoing the prompt's "Grade (1-5): 4" means 4)."""
    for match in _INTEGER.finditer(_SCALE.sub(" ", reply)):
        value = int(match.group())
        if 1 <= value <= 5:
            return value
    return None
