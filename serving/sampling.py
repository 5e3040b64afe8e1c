"""Per-row sampling and stop-string handling: pure functions of one row's logits, text and settings.

Each row of a batch carries its own :class:`SamplingParams` and ``torch.Generator``, so rows with
different settings (greedy, temperature + top-p, seeds) share a forward call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

# vLLM's _SAMPLING_EPS: a temperature below it is greedy. logits / 1e-40 overflows to inf, and softmax of
# an inf is nan, which torch.multinomial refuses (on CUDA, a device-side assert that poisons the process).
SAMPLING_EPS = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's: generate exactly max_tokens (benchmarks, tests that need a busy engine)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


def new_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The row's own random stream (``None`` for greedy rows), so a seed reproduces whatever the batch."""
    if not params.greedy:
        generator = torch.Generator(device=device)
        seed = params.seed
        generator.manual_seed(
            int(seed) & 0xFFFF_FFFF_FFFF_FFFF if seed is not None else int.from_bytes(os.urandom(8), "little")
        )
        return generator
    return None


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of ``logits``: greedy, or temperature + top-p with that row's generator."""
    logits = logits.float()
    out = logits.argmax(dim=-1).tolist()
    for i, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.greedy or generator is None:
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)
        # An inf or nan logit (a model overflowing in half precision) makes the softmax nan: the row keeps its
        # argmax (the inf's token, the softmax's limit) instead of failing, and with it its whole batch.
        if not torch.isfinite(probs).all():
            continue
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cum = sorted_p.cumsum(-1)
            drop = (cum - sorted_p) > p.top_p  # keep the smallest prefix reaching top_p (>= 1 token)
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
            out[i] = int(order[choice].item())
        else:
            out[i] = int(torch.multinomial(probs, 1, generator=generator).item())
    return out


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found (the stop itself is not returned)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], True
    return text, False


def streamable(text: str, stops: list[str]) -> int:
    """How much of an unfinished row's ``text`` may be streamed now without taking anything back later."""
    safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence is not text yet
    safe -= held_back(text[:safe], stops)  # might be the start of a stop string
    return safe


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
