"""The single-adapter path: a forward whose rows all use one adapter skips peft's per-row split.

With adapters loaded, a mixed batch passes peft's per-row ``adapter_names``: peft then hooks every LoRA
layer for the call, and each splits the batch by adapter and scatters each part's low-rank product
back, which made a single stream's decode step 2x slower with the project's LoRA (r=16 on all seven
projections) on 2 cores.  When every row uses the same adapter, :class:`SingleAdapter` instead makes it
peft's active adapter (the same products on the whole batch, so the same numbers); when every row uses
the base model it switches the LoRA layers off.

Merging the adapter into the weights (peft's ``merge_adapter``) would also drop the low-rank products,
but with int8 weights (:mod:`serving.quantize`) the merged weights would have to be rounded to int8
again, and a LoRA delta smaller than half an int8 step disappears in that rounding; docs/BENCHMARKS.md
("Single stream (issue 13)") measures both.

Worker thread only.  :mod:`serving.adapters` calls :meth:`SingleAdapter.reset` before it loads or
unloads an adapter, so peft always sees its plain state there.
"""

from __future__ import annotations

from typing import Any

_MIXED = object()  # the plain state: LoRA layers on, the batch passes adapter_names


class SingleAdapter:
    def __init__(self) -> None:
        self._peft: Any = None
        self._current: Any = _MIXED  # an adapter name, None (the base model), or _MIXED

    def use(self, peft: Any, name: str | None) -> None:
        """Make ``peft``'s next forward without ``adapter_names`` run ``name`` (None: the base model)."""
        if self._current is not _MIXED and self._peft is peft and self._current == name:
            return
        if name is None:
            peft.base_model.disable_adapter_layers()
        else:
            if self._current is None:  # from "off" back to on
                peft.base_model.enable_adapter_layers()
            peft.set_adapter(name, inference_mode=True)
        self._peft, self._current = peft, name

    def reset(self) -> None:
        """Back to the plain state: LoRA layers on, so per-row ``adapter_names`` apply."""
        if self._current is None:
            self._peft.base_model.enable_adapter_layers()
        self._peft, self._current = None, _MIXED
