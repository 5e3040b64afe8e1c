"""fp32 against bf16 weights on this CPU, side by side in one run: prefill, decode, a LoRA training step.

What `--dtype auto` (serving) and training choose depends on whether the CPU multiplies bf16 natively
(AVX512-BF16 or AMX, as oneDNN reports it); this measures what that choice is worth on SmolLM2-135M:

* prefill - one forward over `--batch` prompts of `--prompt-tokens` tokens (logits for the last position
  only, as the engine asks), the cost of reading a search prompt with its retrieved passage;
* decode - one step of `--batch` rows over that KV cache, the cost of each answer token;
* LoRA step - forward, backward and AdamW over 4 rows of 260 tokens with the project's LoRA (r=16 on the
  attention and MLP projections; adapter weights fp32, as peft keeps them), the demo's training step;
* engine - `--searches` chat requests at `--batch` concurrent through `serving.engine.Engine` (continuous
  batching), each a search prompt with one pydoc passage of 1,000 characters and 48 sampled tokens:
  what the demo's simulated users wait for.

Each figure is the median of `--repeats` runs after one warm-up; the ratio column is fp32 time / bf16 time.

    .venv/bin/python bench/cpu_dtype.py [--batch 16] [--prompt-tokens 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.search_traffic import searches_per_s  # noqa: E402
from store.config import apply_runtime_env  # noqa: E402


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _measure(dtype, args) -> dict[str, float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DynamicCache

    from serving.kv_cache import cache_argument
    from serving.model import resolve_base_model
    from training.train import LORA_TARGETS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(resolve_base_model("default")), dtype=dtype).eval()
    prompts = torch.randint(100, 20000, (args.batch, args.prompt_tokens))
    figures = {}
    with torch.inference_mode():
        figures["prefill"] = _median_seconds(lambda: model(prompts, use_cache=True, logits_to_keep=1), args.repeats)
        cache = {cache_argument(model): DynamicCache(config=model.config)}
        model(prompts, use_cache=True, logits_to_keep=1, **cache)
        step = torch.randint(100, 20000, (args.batch, 1))

        # Each repeat appends one position to the cache: a few tokens more context, which is negligible here.
        figures["decode"] = _median_seconds(lambda: model(step, use_cache=True, logits_to_keep=1, **cache),
                                            args.repeats)
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM"))
    lora.train()
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
    rows = torch.randint(100, 20000, (4, 260))

    def train_step():
        lora(input_ids=rows, labels=rows).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    figures["lora_step"] = _median_seconds(train_step, args.repeats)
    return figures


def _engine_searches_per_s(dtype_name: str, args) -> float:
    import asyncio

    from serving.engine import Engine
    from serving.model import load_base_model
    from serving.sampling import SamplingParams

    engine = Engine(load_base_model("default", dtype=dtype_name), max_batch=args.batch)
    engine.start()

    def run(n: int) -> float:
        return asyncio.run(searches_per_s(engine, n, concurrency=args.batch,
                                          params=lambda i: SamplingParams(max_tokens=48, temperature=0.7, seed=i)))

    try:
        run(4)  # warm-up
        return run(args.searches)
    finally:
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--searches", type=int, default=32, help="engine: chat requests per dtype")
    args = parser.parse_args()
    apply_runtime_env()
    import torch

    from store.runtime import choose_device_dtype, cpu_has_native_bf16

    results = {name: _measure(dtype, args) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    engine = {name: _engine_searches_per_s(dtype_name, args)
              for name, dtype_name in (("fp32", "float32"), ("bf16", "bfloat16"))}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}, "
          f"--dtype auto picks {str(choose_device_dtype('cpu')[1]).removeprefix('torch.')}\n")
    tokens = {"prefill": args.batch * args.prompt_tokens, "decode": args.batch, "lora_step": 4 * 260}
    print("| measure | fp32 s | bf16 s | fp32 tokens/s | bf16 tokens/s | fp32 / bf16 |")
    print("|---|---:|---:|---:|---:|---:|")
    for measure in ("prefill", "decode", "lora_step"):
        fp32, bf16 = results["fp32"][measure], results["bf16"][measure]
        print(f"| {measure} | {fp32:.3f} | {bf16:.3f} | {tokens[measure] / fp32:.0f} | {tokens[measure] / bf16:.0f} "
              f"| {fp32 / bf16:.2f}x |")
    print(f"\n| engine, {args.searches} searches at {args.batch} concurrent | fp32 searches/s | bf16 searches/s "
          f"| bf16 / fp32 |\n|---|---:|---:|---:|\n| 1 passage, 48 tokens | {engine['fp32']:.2f} | "
          f"{engine['bf16']:.2f} | {engine['bf16'] / engine['fp32']:.2f}x |")
    print(f"\ncommand: python bench/cpu_dtype.py --batch {args.batch} --prompt-tokens {args.prompt_tokens} "
          f"--repeats {args.repeats} --searches {args.searches}")


if __name__ == "__main__":
    main()
