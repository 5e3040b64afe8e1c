"""Turn the active prompt template, the retrieved passages and the question into chat messages.

The messages are logged verbatim: training learns from exactly what the model was shown.
"""

from __future__ import annotations

import re
from typing import Any

from retrieval.index import Hit
from store.models import PromptTemplate

_FIELD = re.compile(r"\{(context|question)\}")


def format_context(hits: list[Hit]) -> str:
    if not hits:
        return "(no passages found)"
    return "\n\n".join(f"[{n}] {hit.title}\n{hit.text}" for n, hit in enumerate(hits, start=1))


def build_messages(template: PromptTemplate, hits: list[Hit], question: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": template.system_prompt}]
    for example in template.few_shot or []:
        messages.append({"role": "user", "content": example["question"]})
        messages.append({"role": "assistant", "content": example["answer"]})
    values = {"context": format_context(hits), "question": question}
    # One pass, so a question that happens to contain "{context}" stays as the user typed it.
    messages.append({"role": "user", "content": _FIELD.sub(lambda m: values[m.group(1)], template.template)})
    return messages
