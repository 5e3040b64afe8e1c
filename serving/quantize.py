"""Weight-only int8 for the base model's linear layers: the single stream reads half the bytes.

Decoding one token reads every weight once, so a single stream is bound by the bytes read per token
(bf16: 270 MB for SmolLM2-135M).  torch's CPU kernel ``_weight_int8pack_mm`` multiplies activations in
the model's dtype by int8 weights with one scale per output channel; on this project's 2-core CPU it
is 2-3x faster than bf16 for 1 to 4 rows, but slower from about 8 rows on (it dequantises per row),
and a prefill is compute-bound.  So each layer holds its int8 weights twice: as int8 for calls of at
most ``max_rows`` rows (the single stream), and dequantised in the model's dtype as its ``weight``
for larger calls (batches, prefill), which run the usual matmul.  Both hold the same values, so a
request's greedy answer does not depend on how many others share its batch (docs/BENCHMARKS.md,
"Single stream (issue 13)").

The dequantised weights are written into the layer's own ``weight`` tensor, so tied embeddings stay
tied (and are int8-rounded too), and peft wraps the layer like any ``nn.Linear`` and applies LoRA on
top in the weight's dtype (bf16), unquantised.
"""

from __future__ import annotations

import torch
from torch import nn

INT8_MAX_ROWS = 4  # the crossover measured on 2 cores: int8 wins up to 4 rows, bf16 from 8
# The kernel reads the input in whole vectors: with in_features not a multiple of 16 it crashed the
# process (torch 2.13, AVX512); such layers keep their weight only.
_INT8_K_MULTIPLE = 32


class Int8Linear(nn.Linear):
    """An ``nn.Linear`` whose weight is int8-rounded, with the int8 copy used for calls of few rows."""

    def __init__(self, linear: nn.Linear, max_rows: int = INT8_MAX_ROWS):
        nn.Module.__init__(self)  # not nn.Linear's: that would allocate a fresh weight
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.max_rows = max_rows
        self.requantize()

    @staticmethod
    @torch.no_grad()
    def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``weight`` as int8 with one scale per output channel (symmetric): int8, scales, dequantised.

        The scales and the dequantised weight are in ``weight``'s dtype.
        """
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(weight.dtype)
        q = (w / scale.float()[:, None]).round_().clamp_(-127, 127)
        return q.to(torch.int8), scale, (q * scale.float()[:, None]).to(weight.dtype)

    def requantize(self) -> None:
        """Round :attr:`weight` to int8 in place and keep the int8 copy."""
        int8_weight, int8_scale, dequantised = self.quantize_weight(self.weight)
        with torch.no_grad():
            self.weight.copy_(dequantised)
        # Not persistent: derived from the weight.
        self.register_buffer("int8_weight", int8_weight, persistent=False)
        self.register_buffer("int8_scale", int8_scale, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if not 0 < rows <= self.max_rows or x.dtype != self.int8_scale.dtype or (
            torch.is_grad_enabled() and self.weight.requires_grad
        ):
            return nn.functional.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(flat, self.int8_weight, self.int8_scale)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 up to {self.max_rows} rows"


def quantize_linears(model: nn.Module, max_rows: int = INT8_MAX_ROWS) -> int:
    """Round the plain ``nn.Linear`` layers of ``model`` to int8 (:class:`Int8Linear`); returns how many.

    Call it before any adapter is loaded: peft then wraps the :class:`Int8Linear` layers.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and m.in_features % _INT8_K_MULTIPLE == 0]
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, Int8Linear(linear, max_rows))
    return len(targets)
