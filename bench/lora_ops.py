"""Operators one LoRA training pass dispatches, per option: a CPU count of what the GPU launches.

On an H200 the project's 1.7B step is bound by the host, not the GPU: about 6,550 kernel launches
per step, the GPU busy 29% of the time (docs/BENCHMARKS.md, "GPU training"). Fewer operators per
pass is the lever this machine can measure without a GPU: each forward and backward below runs
under bf16 autocast, as training does on CUDA, and every ATen operator it dispatches is counted
(a `TorchDispatchMode`). "kernels" leaves out the operators that only alias memory (views,
transposes, detach) or only allocate; on CUDA each of the rest is a kernel launch or more.

Variants, all LoRA r=16 on the seven projections with fp32 adapter weights (peft's default):

  peft-default     peft casts every projection's input to the adapter's fp32, dropout 0.05
  autocast-inputs  the input left to autocast (what `train_lora` does on CUDA): same numbers
  no-dropout       dropout 0 (`abloop train --lora-dropout 0`): peft skips the dropout module
  both             the two together

The counts do not depend on the width or the tokens, only on the depth: each model is built with
its real widths and 2 and 3 layers, and the count scaled to its depth (layers are identical). The
attention here is SDPA over one padded row; on CUDA the packed path calls the varlen kernel instead
(the same count of attention operators per layer, give or take one). The optimizer step is not
counted.

    .venv/bin/python bench/lora_ops.py [--sizes 135M,360M,1.7B] [--tokens 64]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gpu_train import SHAPES, VOCAB  # noqa: E402

VARIANTS = {  # name: (inputs left to autocast, lora_dropout)
    "peft-default": (False, 0.05),
    "autocast-inputs": (True, 0.05),
    "no-dropout": (False, 0.0),
    "both": (True, 0.0),
}
_ALLOCATING = {"empty", "empty_like", "empty_strided", "lift_fresh"}


def operator_count() -> Any:
    """A `TorchDispatchMode` that counts the ATen operators dispatched inside it (its `ops` Counter)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter[Any] = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func] += 1
            return func(*args, **(kwargs or {}))

    return _Count()


def count_pass(shape: dict[str, Any], layers: int, *, autocast_inputs: bool, lora_dropout: float, tokens: int):
    """Operators dispatched by one forward and one backward: (forward, backward) Counters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.train import LORA_TARGETS, adapter_inputs_left_to_autocast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=True, **{**shape, "num_hidden_layers": layers})
    base = LlamaForCausalLM(config).to(torch.bfloat16)  # the CUDA path's frozen base
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=lora_dropout, target_modules=LORA_TARGETS)
    model = get_peft_model(base, lora)  # adapters upcast to fp32, as peft does by default
    model.train()
    ids = torch.randint(0, VOCAB, (1, tokens))

    def casting() -> Any:
        return adapter_inputs_left_to_autocast(model, mixed_precision=autocast_inputs)

    with casting(), operator_count() as forward, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    with casting(), operator_count() as backward:
        loss.backward()
    return forward.ops, backward.ops


def kernels(ops: collections.Counter) -> int:
    """Operators that compute (on CUDA: launch), leaving out aliases and bare allocations."""
    return sum(n for op, n in ops.items() if not op.is_view and op.overloadpacket.__name__ not in _ALLOCATING
               and op.overloadpacket.__name__ not in ("detach", "_unsafe_view"))  # fmt: skip


def casts(ops: collections.Counter) -> int:
    return sum(n for op, n in ops.items() if op.overloadpacket.__name__ == "_to_copy")


def scaled(size: str, variant: str, tokens: int) -> dict[str, int]:
    """One pass's counts at the size's full depth, from 2- and 3-layer builds."""
    autocast_inputs, dropout = VARIANTS[variant]
    shape = SHAPES[size]
    two, three = (count_pass(shape, n, autocast_inputs=autocast_inputs, lora_dropout=dropout, tokens=tokens)
                  for n in (2, 3))  # fmt: skip
    depth = shape["num_hidden_layers"]
    out = {}
    for name, measure in (("all", lambda c: sum(c.values())), ("kernels", kernels), ("casts", casts)):
        for phase, i in (("forward", 0), ("backward", 1)):
            a, b = measure(two[i]), measure(three[i])
            out[f"{phase}_{name}"] = a + (depth - 2) * (b - a)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="135M,360M,1.7B", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--tokens", type=int, default=64, help="tokens in the row (the counts do not depend on it)")
    args = parser.parse_args()
    import torch

    print(f"Operators per forward + backward pass, LoRA r=16 on 7 projections, bf16 autocast; torch {torch.__version__}")  # noqa: E501
    print("| size | variant | forward ops | backward ops | kernels (fwd+bwd) | casts (fwd+bwd) | kernels vs peft-default |")  # noqa: E501
    print("|---|---|---:|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        rows = {variant: scaled(size, variant, args.tokens) for variant in VARIANTS}
        reference = rows["peft-default"]["forward_kernels"] + rows["peft-default"]["backward_kernels"]
        for variant, r in rows.items():
            k = r["forward_kernels"] + r["backward_kernels"]
            print(f"| {size} | {variant} | {r['forward_all']:,} | {r['backward_all']:,} | {k:,} | "
                  f"{r['forward_casts'] + r['backward_casts']:,} | {k / reference:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
