"""torch's int8 weight kernel against the plain matmul, per activation dtype, on this CPU.

`--quantize int8` (serving.quantize) runs ``torch._weight_int8pack_mm`` for decode steps of a few rows,
with activations in the model's dtype. Whether that is faster than the plain matmul depends on the CPU and
on that dtype: torch vectorises the kernel for bf16 activations, and an fp32 model (dtype "auto" on a CPU
without native bf16) takes its scalar path. Two parts, each measured side by side in interleaved rounds:

1. **one layer**, one row, SmolLM2-135M's shapes (q/o 576x576, gate/up 1536x576, down 576x1536, the tied
   LM head 49152x576): fp32 matmul, int8 with fp32 activations, bf16 matmul, int8 with bf16 activations.
   Median microseconds a call over ``--rounds`` rounds of ``--calls`` calls.
2. **decode step**: SmolLM2-135M-Instruct, one row, greedy ``--tokens`` tokens after a chat prompt
   (bench/single_stream.py's decode loop; the prefill not timed; a different prompt each round);
   `load_base_model` with fp32 and bf16 weights, quantize none and int8. Median milliseconds a token.

    .venv/bin/python bench/int8_kernel.py [--rounds 3] [--calls 200] [--tokens 30]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.* from any working directory

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
    from bench.single_stream import Variant, chat_prompt_ids, greedy_decode
    from serving.model import load_base_model

    setups = [("float32", "none"), ("float32", "int8"), ("bfloat16", "none"), ("bfloat16", "int8")]
    loaded = {setup: load_base_model(dtype=setup[0], quantize=setup[1]) for setup in setups}
    variants = {setup: Variant(f"{setup[0]}, {setup[1]}", m.model, m.model.config) for setup, m in loaded.items()}
    prompts = chat_prompt_ids(loaded[setups[0]].tokenizer)
    for round_ in range(rounds):
        for variant in variants.values():
            wall, cpu, _ = greedy_decode(variant, prompts[round_ % len(prompts)], tokens)
            variant.runs.append((wall, cpu))
    baseline = statistics.median(wall for wall, _ in variants[setups[0]].runs)
    print("\n| weights | --quantize | ms/token (median) | vs fp32, none |")
    print("|---|---|---:|---:|")
    for (dtype, quantize), variant in variants.items():
        wall = statistics.median(w for w, _ in variant.runs)
        print(f"| {dtype} | {quantize} | {wall * 1e3:.1f} | {baseline / wall:.2f}x |")


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
