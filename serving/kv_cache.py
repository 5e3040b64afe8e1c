"""A KV cache layer with room to grow: a decode step writes its one position instead of copying the cache.

transformers' ``DynamicLayer`` appends each step's keys and values with ``torch.cat``, which copies the whole
layer's cache every decode step: for 16 search prompts of ~300 tokens on SmolLM2-135M that copying was a fifth
of a decode step on 2 cores (docs/BENCHMARKS.md, "KV cache with room to grow"). :class:`SlackLayer` keeps each
tensor in a buffer longer than its content and returns views of the filled part; when the buffer is full it
grows by a quarter of its length or ``MIN_SLACK`` positions, whichever is more, and only then is the content
copied.

The runner imports this module when it starts (it imports transformers). It is a drop-in ``DynamicLayer``:
whatever assigns ``keys`` or ``values`` (the runner's row selection, merges and trims, or transformers' own
``batch_select_indices``) hands over a tensor that becomes the new content, without slack; the next update
grows it once.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

MIN_SLACK = 64  # positions added at least when a buffer grows


class _Content:
    """A cache tensor: the filled prefix of its buffer. Assigning a tensor makes it the content and the buffer."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._content, self._buffer = f"_{name}", f"_{name}_buffer"

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        return self if layer is None else getattr(layer, self._content)

    def __set__(self, layer: Any, tensor: torch.Tensor | None) -> None:
        setattr(layer, self._content, tensor)
        setattr(layer, self._buffer, tensor)


class SlackLayer(DynamicLayer):
    keys = _Content()
    values = _Content()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._keys_buffer, self._keys = _append(self._keys_buffer, self._keys, key_states)
        self._values_buffer, self._values = _append(self._values_buffer, self._values, value_states)
        return self._keys, self._values


def _append(buffer: torch.Tensor | None, content: torch.Tensor | None,
            new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write ``new`` after ``content`` (a prefix of ``buffer`` along dim -2); a larger buffer when it is full."""
    length = content.shape[-2] if content is not None and content.dim() == 4 else 0  # lazy init: a 1-D empty
    end = length + new.shape[-2]
    if buffer is None or length == 0 or end > buffer.shape[-2]:
        grown = new.new_empty((*new.shape[:2], end + max(MIN_SLACK, end // 4), new.shape[-1]))
        if length:
            grown[:, :, :length].copy_(content)
        buffer = grown
    buffer[:, :, length:end].copy_(new)
    return buffer, buffer[:, :, :end]


def cache_argument(model: Any) -> str:
    """The name under which ``model``'s forward takes its KV cache: ``cache`` from transformers 5.2x on (where
    ``past_key_values`` is deprecated, to be removed in 5.40), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def growing_cache(config: Any) -> Any:
    """A ``DynamicCache`` for ``config`` whose plain layers are :class:`SlackLayer` (sliding-window ones are kept)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    cache.layers = [SlackLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
