"""LoRA in the serving forward: each row on its own adapter, without peft's per-row split.

While an experiment runs, the candidate is a LoRA adapter on the control's base model, so the model
server's batches mix base rows and adapter rows. peft serves a mixed batch through its per-row
``adapter_names``: it hooks every LoRA layer for the call, and each splits the batch by adapter and
scatters each part's low-rank product back. Its plain forward, for one active adapter, casts the whole
input to the adapters' fp32 and adds an fp32 product of the layer's full width: elementwise passes over
the whole activation, which made a prefill of 16 search prompts (16 x 300 tokens, bf16) 1.3x slower
than without the adapter on 2 cores (docs/BENCHMARKS.md, "LoRA rows in a mixed batch").

:class:`LoraRouting` gives every plain LoRA linear layer a forward of its own, which adds, for each adapter
present in the batch, ``B(A x) * scale`` on that adapter's rows only: the low-rank activations ``A x``
(``rank`` wide) are multiplied by a 0/1 row mask before the expansion, so a base row gets exactly the
base layer's output and rows of other adapters get nothing from this one.

* **Small calls** (decode steps: at most ``LARGE_CALL`` positions) compute exactly peft's products
  (fp32 adapters, the same ``linear`` calls), so an adapter row gets the very numbers peft gives it when
  that adapter is the active one.
* **Large calls** (prefills) run the product in the model's dtype instead, added in place
  (``addmm_``): a bf16 model then never materialises an fp32 copy of its input or output. This changes
  the last bits of adapter rows, as vLLM's bf16 LoRA kernels do, by about as much as putting a prompt in
  a batch rather than alone does (bench/mixed_lora.py measures both; tests/serving bound it).

Layers of another kind (DoRA and other variants, a LoRA bias, embeddings, convolutions, fan-in-fan-out
weights) keep peft's own forward, and the runner then passes peft's ``adapter_names``.

Merging the adapter into the weights (peft's ``merge_adapter``) would drop the low-rank products too,
but only when every row uses the same adapter, and with int8 weights (:mod:`serving.quantize`) the
merged weights would have to be rounded to int8 again; docs/BENCHMARKS.md ("Single stream (issue 13)").

Worker thread only.  :mod:`serving.adapters` calls :meth:`LoraRouting.reset` before it loads or
unloads an adapter, so peft always sees its own layers there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, NamedTuple

LARGE_CALL = 256  # positions in one call above which the product runs in the model's dtype


class LoraRouting:
    def __init__(self) -> None:
        self._peft: Any = None
        self._layers: list[Any] | None = None  # the layers given our forward; None: peft's own forward
        self._dtypes: set[Any] = set()  # the dtypes of the low-rank products: the adapters' and the model's
        self._device: Any = None
        # For the forward under way: (adapter, its 0/1 row mask by dtype; empty when every row uses it).
        self._plan: list[tuple[str, dict[Any, Any]]] = []

    def install(self, peft: Any) -> bool:
        """Give ``peft``'s LoRA layers the serving forward; False (peft's forward kept) where one cannot take it."""
        if self._peft is peft:
            return self._layers is not None
        self.reset()
        self._peft = peft
        layers = _lora_layers(peft)
        if not all(_plain(layer) for layer in layers):
            return False
        for layer in layers:
            layer._serving_weights = {name: _weights(layer, name) for name in layer.lora_A}
            layer.forward = partial(_forward, layer, self)
            self._dtypes |= {w.weight.dtype for w in layer.lora_A.values()} | {layer.get_base_layer().weight.dtype}
            self._device = layer.get_base_layer().weight.device
        self._layers = layers
        return True

    @contextmanager
    def rows(self, row_adapters: Sequence[str | None]) -> Iterator[None]:
        """Run the enclosed forward with row i on adapter ``row_adapters[i]`` (None: the base model)."""
        import torch

        present = sorted({name for name in row_adapters if name is not None})
        if len(present) == 1 and None not in row_adapters:
            self._plan = [(present[0], {})]  # every row on one adapter: nothing to mask
        else:  # a 0/1 mask per adapter, in the dtypes the products take (the adapters' and the model's)
            self._plan = []
            for name in present:
                mask = torch.tensor([float(row == name) for row in row_adapters]).view(-1, 1, 1)
                self._plan.append((name, {dtype: mask.to(self._device, dtype) for dtype in self._dtypes}))
        try:
            yield
        finally:
            self._plan = []

    def reset(self) -> None:
        """Give the layers peft's own forward back (before peft loads or unloads an adapter)."""
        for layer in self._layers or []:
            del layer.forward, layer._serving_weights
        self._peft, self._layers, self._plan, self._dtypes = None, None, [], set()


def _lora_layers(peft: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [module for module in peft.modules() if isinstance(module, LoraLayer)]


def _plain(layer: Any) -> bool:
    """A plain LoRA linear layer: ``base(x) + B(A(x)) * scale`` and nothing else (peft >= 0.13 is allowed,
    so attributes a peft release may lack are read with the value that means "plain")."""
    from peft.tuners.lora import Linear

    return (type(layer) is Linear and not getattr(layer, "lora_variant", None)
            and not any(getattr(layer, "use_dora", {}).values()) and not getattr(layer, "fan_in_fan_out", False)
            and not layer.merged and getattr(layer, "cast_input_dtype_enabled", True)
            and all(b.bias is None for b in layer.lora_B.values()))


class _Weights(NamedTuple):
    a: Any  # lora_A's weight, [rank, in], in the adapter's dtype (fp32, as peft keeps it)
    b: Any  # lora_B's weight, [out, rank]
    scale: float
    a_model: Any  # a in the base layer's dtype, for large calls
    scaled_b_model: Any  # (b * scale).T in the base layer's dtype, [rank, out], for large calls


def _weights(layer: Any, name: str) -> _Weights:
    dtype = layer.get_base_layer().weight.dtype
    a, b, scale = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach(), layer.scaling[name]
    return _Weights(a, b, scale, a.to(dtype), (b * scale).to(dtype).t())


def _forward(layer: Any, routing: LoraRouting, x: Any, *args: Any, **kwargs: Any) -> Any:
    import torch.nn.functional as F

    result = layer.base_layer(x, *args, **kwargs)
    if not routing._plan:
        return result
    weights = layer._serving_weights
    if x.numel() // x.shape[-1] > LARGE_CALL:
        flat = result.view(-1, result.shape[-1])
        for name, masks in routing._plan:
            w = weights[name]
            low = F.linear(x.to(w.a_model.dtype), w.a_model)
            if masks:
                low = low * masks[low.dtype]
            flat.addmm_(low.reshape(-1, low.shape[-1]), w.scaled_b_model)
        return result
    dtype = result.dtype
    for name, masks in routing._plan:  # the very operations of peft's lora.Linear.forward, masked by row
        w = weights[name]
        low = F.linear(x.to(w.a.dtype), w.a)
        if masks:
            low = low * masks[low.dtype]
        result = result + F.linear(low, w.b) * w.scale
    return result.to(dtype)
