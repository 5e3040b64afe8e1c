"""Search traffic for the model-server benches: the demo's prompt shape, sent to an in-process engine.

A search prompt is the proxy's system prompt and one retrieved pydoc passage of 1,000 characters, about 300
tokens with the chat template: what the demo's simulated users make the model read. A candidate arm is a
LoRA adapter like the project's (`save_random_adapter`), and `candidate_every(share)` spreads that share of
searches onto it evenly. Heavy imports stay inside the functions, so a bench can import this before it
decides what to load.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Callable
from pathlib import Path
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


def candidate_every(share: float, adapter: str = "candidate") -> Callable[[int], str | None]:
    """Search i's adapter: `adapter` for `share` of the searches, spread evenly (None: the base model)."""
    return lambda i: adapter if int((i + 1) * share) > int(i * share) else None


def save_random_adapter(out: Path) -> Path:
    """The project's LoRA (r=16 on all seven projections) on SmolLM2 with random weights, saved to `out`.

    Speed does not depend on the weights; B is drawn small (std 0.02) rather than left at peft's 0, so that the
    adapter changes the answers as a trained one does.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from serving.model import resolve_base_model
    from training.train import LORA_TARGETS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(resolve_base_model("default")), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS,
                                                init_lora_weights="gaussian", task_type="CAUSAL_LM"))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    peft.save_pretrained(str(out))
    return out
