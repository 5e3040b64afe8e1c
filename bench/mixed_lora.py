"""An A/B test's batches on the embedded model server: base and candidate rows together, side by side in one run.

While an experiment runs, the candidate is a LoRA adapter on the control's base model, so one model server
answers both arms and its batches mix base rows and adapter rows. This measures `serving.engine.Engine`
on SmolLM2-135M with the project's LoRA (r=16 on all seven projections, random weights: speed does not
depend on them), each search a chat prompt with one pydoc passage of 1,000 characters and `--max-tokens`
generated tokens (EOS ignored, so that every mode generates the same tokens), `--searches` at
`--concurrency` concurrent:

* `base only` - the base model alone (the demo's warm-up);
* `adapter only` - the one-adapter path;
* `mixed: per row` - every `--share` candidate row mixed with base rows through peft's per-row
  `adapter_names` (`Engine(per_row_lora=True)`, the previous path);
* `mixed: masked rows` - the same traffic through `serving.lora_routing`'s masked rows (the default).

Modes alternate for `--rounds` rounds (the machine is noisy); each figure is searches/s of one round.
The adapter's B weights are drawn small (std 0.02) rather than left at peft's 0, so that it changes the
answers; the quality line compares, on one prefill of search prompts, the next token that
`serving.lora_routing` (the adapter's product in bf16 for such large calls) and peft's own forward (fp32
product) predict at every position.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/mixed_lora.py [--rounds 2] [--searches 48] [--share 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.search_traffic import (  # noqa: E402
    candidate_every,
    save_random_adapter,
    search_messages,
    searches_per_s,
)
from store.config import apply_runtime_env  # noqa: E402

MODES = ("base only", "adapter only", "mixed: per row", "mixed: masked rows")


def _searches_per_s(mode: str, adapter: Path, args) -> tuple[float, dict[str, int]]:
    from serving.engine import Engine
    from serving.model import load_base_model
    from serving.sampling import SamplingParams

    engine = Engine(load_base_model("default"), max_batch=args.concurrency, per_row_lora=mode == "mixed: per row")
    engine.start()

    mixed = candidate_every(args.share)

    def arm(i: int) -> str | None:
        if mode == "base only":
            return None
        if mode == "adapter only":
            return "candidate"
        return mixed(i)

    def params(i: int) -> SamplingParams:
        return SamplingParams(max_tokens=args.max_tokens, temperature=0.7, seed=i, ignore_eos=True)

    async def run(n: int) -> float:
        if mode != "base only" and "candidate" not in engine.adapters():
            await engine.load_adapter("candidate", str(adapter))
        return await searches_per_s(engine, n, concurrency=args.concurrency, params=params, adapter=arm)

    try:
        asyncio.run(run(4))  # warm-up: loads the adapter, picks kernels
        rate = asyncio.run(run(args.searches))
        return rate, engine.stats.as_dict()
    finally:
        engine.stop()


def _prefill_agreement(adapter: Path, args) -> str:
    """Prefill logits of adapter rows, serving.lora_routing against peft's own forward, on one batch."""
    from pydoc_data.topics import topics

    import torch
    from peft import PeftModel

    from serving.lora_routing import LoraRouting
    from serving.model import load_base_model

    loaded = load_base_model("default")
    tokenizer = loaded.tokenizer
    texts = [tokenizer.apply_chat_template(search_messages(topic, f"what is {topic}?"), tokenize=False,
                                           add_generation_prompt=True) for topic in sorted(topics)[:args.concurrency]]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    peft = PeftModel.from_pretrained(loaded.model, str(adapter), adapter_name="candidate").eval()
    with torch.inference_mode():
        reference = peft(**batch).logits.float()
        # The noise floor: peft's own forward on each prompt alone, against the same prompt in the batch.
        alone = torch.zeros_like(reference)
        for i, text in enumerate(texts):
            one = tokenizer([text], return_tensors="pt")
            alone[i, -one["input_ids"].shape[1]:] = peft(**one).logits[0].float()
        routing = LoraRouting()
        assert routing.install(peft)
        with routing.rows(["candidate"] * len(texts)):
            ours = peft(**batch).logits.float()
        routing.reset()
    valid = batch["attention_mask"].bool()

    def agreement(logits) -> str:
        same = (logits.argmax(-1) == reference.argmax(-1))[valid]
        return (f"{int(same.sum())} of {same.numel()} positions ({same.float().mean():.2%}), largest logit "
                f"difference {float((logits - reference)[valid].abs().max()):.3f}")

    return (f"prefill of {len(texts)} search prompts (bf16 model), next token against peft's forward of the "
            f"batch: serving.lora_routing agrees at {agreement(ours)}; peft's own forward of each prompt alone "
            f"at {agreement(alone)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--searches", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--share", type=float, default=0.5, help="share of candidate rows in the mixed modes")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from: " + ", ".join(MODES))
    args = parser.parse_args()
    modes = [mode.strip() for mode in args.modes.split(",")]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes: {sorted(unknown)}")
    if not 0 < args.share < 1:
        parser.error("--share must be between 0 and 1")
    apply_runtime_env()
    import torch

    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = save_random_adapter(Path(tmp) / "candidate")
        agreement = _prefill_agreement(adapter, args)
        for round_ in range(args.rounds):
            for mode in modes if round_ % 2 == 0 else reversed(modes):
                rate, stats = _searches_per_s(mode, adapter, args)
                rates[mode].append(rate)
                print(f"round {round_ + 1}: {mode}: {rate:.2f} searches/s (masked forwards "
                      f"{stats['masked_forwards']}, per-row forwards {stats['per_row_forwards']})", flush=True)

    print(f"\n{args.searches} searches at {args.concurrency} concurrent, {args.max_tokens} tokens each, candidate "
          f"share {args.share:.0%} in the mixed modes; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    reference = rates[modes[0]]
    print(f"| mode | searches/s, each round | ÷ {modes[0]}, same round |")
    print("|---|---|---|")
    for mode in modes:
        each = ", ".join(f"{r:.2f}" for r in rates[mode])
        ratio = ", ".join(f"{r / ref:.2f}x" for r, ref in zip(rates[mode], reference, strict=True))
        print(f"| {mode} | {each} | {ratio} |")
    print(f"\nQuality: {agreement}")


if __name__ == "__main__":
    main()
