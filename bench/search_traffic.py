"""Search traffic for the model-server benches: the demo's prompt shape, sent to an in-process engine.

A search prompt is the proxy's system prompt and one retrieved pydoc passage of 1,000 characters, about 300
tokens with the chat template: what the demo's simulated users make the model read. Heavy imports stay
inside the functions, so a bench can import this before it decides what to load.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

PASSAGE_CHARS = 1000


def search_messages(topic: str, question: str) -> list[dict[str, str]]:
    """Chat messages of one search: the system prompt, then the pydoc `topic`'s passage and `question`."""
    from pydoc_data.topics import topics

    from store.prompts import DEFAULT_SYSTEM_PROMPT

    passage = topics[topic][:PASSAGE_CHARS]
    return [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": f"Context:\n[1] {topic}\n{passage}\n\nQuestion: {question}"},
    ]


async def searches_per_s(engine: Any, n: int, *, concurrency: int, params: Callable[[int], Any],
                         adapter: Callable[[int], str | None] = lambda _i: None) -> float:
    """Send `n` searches (search i with `params(i)` on `adapter(i)`), `concurrency` at a time; searches/s."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        prompt = engine.encode_chat(search_messages("for", f"how does loop {i} work?"))
        async with gate:
            await engine.submit(prompt, params(i), adapter(i)).result()

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - started)
