"""Decode with a KV cache that grows in place against transformers' concatenating cache, side by side in one run.

`serving.kv_cache.SlackLayer` writes each decode step's keys and values into a buffer with room to spare;
transformers' `DynamicLayer` concatenates, copying the layer's whole cache every step. This runs one
`serving.engine.Engine` on SmolLM2-135M-Instruct (the default model and dtype) and sends it search prompts
(bench/search_traffic.py: the proxy's system prompt and one pydoc passage, ~300 tokens), each generating
`--max-tokens` tokens (EOS ignored, so both modes generate the same tokens), at each `--concurrency`. The two
modes alternate for `--rounds` rounds on the same engine (the machine is noisy); "concatenating" swaps
`serving.kv_cache.growing_cache` for transformers' `DynamicCache` while it runs.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/kv_cache.py [--rounds 3] [--concurrency 1,16] [--max-tokens 64]
        [--share 0.5]   # that share of searches on a LoRA adapter, mixed with base rows as in an experiment
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.search_traffic import candidate_every, save_random_adapter, searches_per_s  # noqa: E402
from store.config import apply_runtime_env  # noqa: E402

MODES = ("concatenating (transformers' DynamicLayer)", "growing (serving.kv_cache)")


def _tokens_per_s(engine, mode: str, concurrency: int, args) -> float:
    import serving.kv_cache as kv_cache
    from serving.sampling import SamplingParams

    def params(i: int) -> SamplingParams:
        return SamplingParams(max_tokens=_max_tokens(i, args), temperature=0.7, seed=i, ignore_eos=True)

    growing = kv_cache.growing_cache
    if mode == MODES[0]:
        from transformers import DynamicCache

        kv_cache.growing_cache = lambda config: DynamicCache(config=config)
    try:
        searches = max(args.searches, concurrency)
        rate = asyncio.run(searches_per_s(engine, searches, concurrency=concurrency, params=params,
                                           adapter=candidate_every(args.share)))
    finally:
        kv_cache.growing_cache = growing
    return rate * sum(_max_tokens(i, args) for i in range(searches)) / searches


def _max_tokens(i: int, args) -> int:
    """With --varied, from half of --max-tokens to all of it, so rows leave and join the batch at every step."""
    if not args.varied:
        return args.max_tokens
    half = args.max_tokens // 2
    return half + (i * 7) % (args.max_tokens - half + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated concurrent searches")
    parser.add_argument("--searches", type=int, default=16, help="searches per measurement (at least concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--varied", action="store_true",
                        help="vary each search's length (continuous batching: rows join and leave all the time)")
    parser.add_argument("--share", type=float, default=0.0,
                        help="share of searches on a LoRA adapter (r=16, random weights) in the same batches")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    apply_runtime_env()
    import torch

    from serving.engine import Engine
    from serving.model import load_base_model
    from serving.sampling import SamplingParams

    loaded = load_base_model("default")
    engine = Engine(loaded, max_batch=max(levels))
    engine.start()
    rates: dict[tuple[int, str], list[float]] = {}
    adapters = tempfile.TemporaryDirectory()
    try:
        if args.share:
            adapter = save_random_adapter(Path(adapters.name) / "candidate")
            asyncio.run(engine.load_adapter("candidate", str(adapter)))
        asyncio.run(searches_per_s(engine, 2, concurrency=2, params=lambda _i: SamplingParams(max_tokens=4)))
        for concurrency in levels:
            for round_ in range(args.rounds):
                for mode in MODES if round_ % 2 == 0 else reversed(MODES):
                    rate = _tokens_per_s(engine, mode, concurrency, args)
                    rates.setdefault((concurrency, mode), []).append(rate)
                    print(f"concurrency {concurrency}, round {round_ + 1}: {mode}: {rate:.1f} tokens/s", flush=True)
    finally:
        engine.stop()
        adapters.cleanup()

    print(f"\nSmolLM2-135M-Instruct, {loaded.dtype} on {loaded.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; search prompts of ~300 tokens, {args.max_tokens} tokens generated "
          f"each, at least {args.searches} searches per figure, {args.share:.0%} of them on a LoRA adapter\n")
    print("| concurrent searches | mode | generated tokens/s, each round | ÷ concatenating, same round |")
    print("|---:|---|---|---|")
    for concurrency in levels:
        reference = rates[(concurrency, MODES[0])]
        for mode in MODES:
            each = ", ".join(f"{r:.1f}" for r in rates[(concurrency, mode)])
            ratio = ", ".join(f"{r / ref:.2f}x" for r, ref in zip(rates[(concurrency, mode)], reference, strict=True))
            print(f"| {concurrency} | {mode} | {each} | {ratio} |")


if __name__ == "__main__":
    main()
