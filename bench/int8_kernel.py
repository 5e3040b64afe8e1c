"""torch's int8 weight kernel against the plain matmul, per activation dtype, on this CPU.

`--quantize int8` (serving.quantize) runs ``torch._weight_int8pack_mm`` for decode steps of a few rows,
with activations in the model's dtype. Whether that is faster than the plain matmul depends on the CPU and
on that dtype: torch vectorises the kernel for bf16 activations, and an fp32 model (dtype "auto" on a CPU
without native bf16) takes its scalar path. Two parts, each measured side by side in interleaved rounds:

1. **one layer**, one row, SmolLM2-135M's shapes (q/o 576x576, gate/up 1536x576, down 576x1536, the tied
   LM head 49152x576): fp32 matmul, int8 with fp32 activations, bf16 matmul, int8 with bf16 activations.
   Median microseconds a call over ``--rounds`` rounds of ``--calls`` calls.
2. **decode step**: SmolLM2-135M-Instruct, one row, a 40-token prefill (not timed), then ``--tokens``
   single-token forwards with a KV cache; `load_base_model` with fp32 and bf16 weights, quantize none
   and int8. Median milliseconds a token.

    .venv/bin/python bench/int8_kernel.py [--rounds 3] [--calls 200] [--tokens 30]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

SHAPES = {"q/o 576x576": (576, 576), "gate/up 1536x576": (1536, 576), "down 576x1536": (576, 1536),
          "LM head 49152x576": (49152, 576)}


def _per_call_us(call: Callable[[], object], calls: int) -> float:
    call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def _layer_calls(out_features: int, in_features: int) -> dict[str, Callable[[], object]]:
    import torch

    from serving.quantize import Int8Linear

    weight = torch.randn(out_features, in_features)
    int8_weight, scale, _ = Int8Linear.quantize_weight(weight)
    x = torch.randn(1, in_features)
    weight_bf16, x_bf16, scale_bf16 = weight.bfloat16(), x.bfloat16(), scale.bfloat16()
    linear, int8_mm = torch.nn.functional.linear, torch.ops.aten._weight_int8pack_mm
    return {
        "fp32": lambda: linear(x, weight),
        "int8, fp32 activations": lambda: int8_mm(x, int8_weight, scale),
        "bf16": lambda: linear(x_bf16, weight_bf16),
        "int8, bf16 activations": lambda: int8_mm(x_bf16, int8_weight, scale_bf16),
    }


def bench_layers(rounds: int, calls: int) -> None:
    import torch

    torch.manual_seed(0)
    layers = {name: _layer_calls(*shape) for name, shape in SHAPES.items()}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for name, variants in layers.items():
            for variant, call in variants.items():
                times.setdefault((name, variant), []).append(_per_call_us(call, calls))
    variants = list(next(iter(layers.values())))
    print("\n| layer (one row) | " + " | ".join(f"{v} (µs)" for v in variants) + " | int8/fp32 | int8 bf16/fp32 |")
    print("|---|" + "---:|" * (len(variants) + 2))
    for name in layers:
        med = {v: statistics.median(times[(name, v)]) for v in variants}
        print(f"| {name} | " + " | ".join(f"{med[v]:,.0f}" for v in variants)
              + f" | {med['int8, fp32 activations'] / med['fp32']:.2f}x | "
              f"{med['int8, bf16 activations'] / med['fp32']:.2f}x |")


def bench_decode(rounds: int, tokens: int) -> None:
    import torch
    from transformers import DynamicCache

    from serving.kv_cache import cache_argument
    from serving.model import load_base_model

    setups = [("float32", "none"), ("float32", "int8"), ("bfloat16", "none"), ("bfloat16", "int8")]
    models = {setup: load_base_model(dtype=setup[0], quantize=setup[1]).model for setup in setups}
    prompt = torch.tensor([[1] * 40])
    times: dict[tuple[str, str], list[float]] = {setup: [] for setup in setups}
    for _ in range(rounds):
        for setup, model in models.items():
            cache = DynamicCache(config=model.config)
            kwargs = {cache_argument(model): cache}
            with torch.inference_mode():
                model(prompt, use_cache=True, logits_to_keep=1, **kwargs)
                start = time.perf_counter()
                for _ in range(tokens):
                    model(torch.tensor([[5]]), use_cache=True, logits_to_keep=1, **kwargs)
            times[setup].append((time.perf_counter() - start) / tokens * 1e3)
    baseline = statistics.median(times[("float32", "none")])
    print("\n| weights | --quantize | ms/token (median) | vs fp32, none |")
    print("|---|---|---:|---:|")
    for (dtype, quantize), measured in times.items():
        ms = statistics.median(measured)
        print(f"| {dtype} | {quantize} | {ms:.1f} | {baseline / ms:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=30)
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    bench_layers(args.rounds, args.calls)
    bench_decode(args.rounds, args.tokens)


if __name__ == "__main__":
    main()
