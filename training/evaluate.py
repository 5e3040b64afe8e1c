"""Offline evaluation of an adapter against its base model, and the gate before any A/B test.

The gate passes only if, on the holdout split,

* the completion loss improves on the base by at least `min_loss_improvement` (relative:
  `(base - adapter) / base`), and
* greedy answers do not regress against the reference answers, by ROUGE-L F1 and by embedding
  cosine similarity (mean over the compared rows, within `answer_tolerance`).

The verdict is written to `eval.json` beside the adapter and, given a database, to the adapter's
row in `adapters.eval_metrics`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from store.db import Database
from training import Encoder, default_encoder
from training.dataset import HOLDOUT_FILE, read_rows

EVAL_FILE = "eval.json"
METRICS_FILE = "metrics.json"
_WORD = re.compile(r"\w+")


@dataclass
class EvalReport:
    adapter: str
    passed: bool
    reasons: list[str]  # why it failed; empty when it passed
    holdout: dict[str, float]  # loss and perplexity, base vs adapter
    answers: dict[str, float]  # ROUGE-L and similarity, base vs adapter
    thresholds: dict[str, float]
    examples: list[dict[str, str]] = field(default_factory=list)
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_adapter(
    data_dir: Path,
    adapter_dir: Path,
    *,
    base_model_dir: Path,
    min_loss_improvement: float = 0.01,
    max_new_tokens: int = 64,
    db: Database | None = None,
    answer_tolerance: float = 0.0,
    max_answers: int = 64,
    batch_size: int = 8,
    embedder: Encoder | None = None,
) -> EvalReport:
    """Compare base and adapter on `data_dir`'s holdout; see the module docstring for the gate."""
    import torch
    from peft import PeftModel

    started = time.perf_counter()
    adapter_dir = Path(adapter_dir)
    rows = read_rows(Path(data_dir) / HOLDOUT_FILE)
    if not rows:
        raise ValueError(f"{data_dir} has an empty holdout split; nothing to evaluate on")
    tokenizer = load_tokenizer(adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_model_dir)
    model = PeftModel.from_pretrained(load_causal_lm(base_model_dir), str(adapter_dir))
    model.eval()

    answer_rows = rows[:max_answers]
    prompts = [r["prompt"] for r in answer_rows]
    with torch.inference_mode():
        with model.disable_adapter():
            base_loss, tokens = completion_loss(model, tokenizer, rows, batch_size=batch_size)
            base_answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        adapter_loss, _ = completion_loss(model, tokenizer, rows, batch_size=batch_size)
        adapter_answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)

    references = [r["completion"][-1]["content"] for r in answer_rows]
    encoder = embedder or default_encoder()
    answers = {
        "n": len(answer_rows),
        "rouge_l_base": _mean(rouge_l(a, r) for a, r in zip(base_answers, references, strict=True)),
        "rouge_l_adapter": _mean(rouge_l(a, r) for a, r in zip(adapter_answers, references, strict=True)),
        "similarity_base": _mean_similarity(encoder, base_answers, references),
        "similarity_adapter": _mean_similarity(encoder, adapter_answers, references),
    }
    holdout = {
        "n": len(rows),
        "tokens": tokens,
        "loss_base": base_loss,
        "loss_adapter": adapter_loss,
        "perplexity_base": perplexity(base_loss),
        "perplexity_adapter": perplexity(adapter_loss),
        "loss_improvement": (base_loss - adapter_loss) / base_loss if base_loss > 0 else 0.0,
    }
    thresholds = {"min_loss_improvement": min_loss_improvement, "answer_tolerance": answer_tolerance}
    report = EvalReport(
        adapter=adapter_dir.name,
        passed=False,
        reasons=_gate(holdout, answers, thresholds),
        holdout=holdout,
        answers=answers,
        thresholds=thresholds,
        examples=[
            {"reference": ref, "base": base, "adapter": tuned}
            for ref, base, tuned in list(zip(references, base_answers, adapter_answers, strict=True))[:5]
        ],
    )
    report.passed = not report.reasons
    del model
    release_memory()
    report.wall_time_s = round(time.perf_counter() - started, 2)
    (adapter_dir / EVAL_FILE).write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
    if db is not None:
        _record(db, adapter_dir, report)
    return report


def _gate(holdout: dict[str, float], answers: dict[str, float], thresholds: dict[str, float]) -> list[str]:
    reasons = []
    if holdout["loss_improvement"] < thresholds["min_loss_improvement"]:
        reasons.append(
            f"holdout loss improved by {holdout['loss_improvement']:.2%} "
            f"(base {holdout['loss_base']:.4f}, adapter {holdout['loss_adapter']:.4f}); "
            f"needs {thresholds['min_loss_improvement']:.2%}"
        )
    for metric in ("rouge_l", "similarity"):
        base, tuned = answers[f"{metric}_base"], answers[f"{metric}_adapter"]
        if tuned < base - thresholds["answer_tolerance"]:
            reasons.append(f"{metric} regressed: base {base:.4f}, adapter {tuned:.4f}")
    return reasons


def _record(db: Database, adapter_dir: Path, report: EvalReport) -> None:
    from training.registry import record_eval

    metrics_path = adapter_dir / METRICS_FILE
    train_metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    record_eval(
        db,
        adapter_dir.name,
        report.to_dict(),
        base_model=train_metrics.get("base_model", "unknown"),
        path=adapter_dir,
        dataset_hash=train_metrics.get("dataset_hash"),
        train_metrics=train_metrics or None,
    )


# --- model helpers shared with training.train and training.export -----------------------------


def device_and_dtype() -> tuple[Any, Any]:
    """The serving policy: CUDA in bf16 (fp16 without bf16); CPU in bf16 where it is native, else fp32."""
    from store.runtime import choose_device_dtype

    return choose_device_dtype()


def release_memory() -> None:
    """Free what a finished stage left behind and hand the freed heap back to the operating system.

    A training step's activations are thousands of allocations small enough for glibc to serve from
    the heap rather than from their own mappings; once freed they stay in the process. In the
    `retrain` flow 3.3 GB stayed resident after training until `malloc_trim`, which brought it to
    1.1 GB (docs/BENCHMARKS.md, "Training memory"). Models also sit in reference cycles (peft and
    trainer hooks) that only the cycle collector frees.
    """
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # cached blocks are invisible to other processes (the model server)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: Path, *, device: Any = None, dtype: Any = None, **kwargs: Any) -> Any:
    """A causal LM on the default device and dtype (quantised models place themselves)."""
    from transformers import AutoModelForCausalLM

    default_device, default_dtype = device_and_dtype()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or default_dtype, **kwargs)
    if "quantization_config" not in kwargs:
        model.to(device or default_device)
    return model


# --- metrics ---------------------------------------------------------------------------------


def encode_pair(
    tokenizer: Any, prompt: list[dict[str, Any]], completion: list[dict[str, Any]]
) -> tuple[list[int], int]:
    """Token ids of prompt + completion and where the completion starts, as trl's SFTTrainer builds them."""
    prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
    full_ids = _chat_ids(tokenizer, prompt + completion, add_generation_prompt=False)
    start = 0
    while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
        start += 1
    return full_ids, start


def completion_loss(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], *, batch_size: int = 8, max_length: int = 1024
) -> tuple[float, int]:
    """Mean negative log-likelihood per completion token over `rows`, and the token count.

    Rows are left-padded so every completion ends at the last position; the model then projects
    only the last `longest completion + 1` positions onto the vocabulary (`logits_to_keep`), which
    skips most of the LM head's work and memory.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    encoded = []
    for row in rows:
        ids, start = encode_pair(tokenizer, row["prompt"], row["completion"])
        ids = ids[:max_length]  # keep_start, like the trainer
        if start < len(ids):
            encoded.append((ids, start))
    encoded.sort(key=lambda item: len(item[0]))  # similar lengths per batch: less padding
    total, count = 0.0, 0
    for offset in range(0, len(encoded), batch_size):
        batch = encoded[offset : offset + batch_size]
        input_ids, attention = _left_padded([ids for ids, _ in batch], tokenizer.pad_token_id)
        keep = max(len(ids) - start for ids, start in batch) + 1
        labels = torch.full((len(batch), keep), -100, dtype=torch.long)
        for i, (ids, start) in enumerate(batch):
            labels[i, keep - (len(ids) - start) :] = torch.tensor(ids[start:])
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            position_ids=(attention.cumsum(-1) - 1).clamp(min=0).to(device),
            logits_to_keep=keep,
        ).logits.float()
        # Position t predicts token t + 1.
        shifted = labels[:, 1:].to(device)
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), shifted, ignore_index=-100, reduction="sum")
        total += float(losses)
        count += int((shifted != -100).sum())
    if count == 0:
        raise ValueError("no completion tokens to score (all rows empty or truncated away)")
    return total / count, count


def generate(
    model: Any, tokenizer: Any, prompts: Sequence[list[dict[str, Any]]], *, max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """Greedy answers to chat `prompts`, batched with left padding."""

    device = next(model.parameters()).device
    outputs: list[str] = []
    for offset in range(0, len(prompts), batch_size):
        batch = [_chat_ids(tokenizer, p, add_generation_prompt=True) for p in prompts[offset : offset + batch_size]]
        input_ids, attention = _left_padded(batch, tokenizer.pad_token_id)
        width = input_ids.shape[1]
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        outputs.extend(tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))
    return [text.strip() for text in outputs]


def _left_padded(sequences: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    import torch

    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, ids in enumerate(sequences):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention[i, width - len(ids) :] = 1
    return input_ids, attention


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (longest common subsequence)."""
    a, b = _WORD.findall(candidate.lower()), _WORD.findall(reference.lower())
    if not a or not b:
        return 0.0
    lcs = _lcs_length(a, b)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _chat_ids(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(encoded["input_ids"])


def _mean_similarity(encoder: Encoder, answers: list[str], references: list[str]) -> float:
    a, b = encoder.encode(answers), encoder.encode(references)
    return float(np.mean(np.einsum("ij,ij->i", a, b))) if len(answers) else 0.0


def _mean(values: Any) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


def perplexity(loss: float) -> float:
    # Capped so the value stays finite, and therefore valid JSON, for a diverged model.
    return math.exp(min(loss, 50.0))
