"""LoRA supervised fine-tuning on a built dataset (trl SFTTrainer + peft).

Loss is on the completion only (the preferred answer), never on the prompt the proxy sent. On CUDA
the base runs in bf16, optionally quantised to 4 bits (bitsandbytes, the `gpu` extra, imported only
then); rows are packed without padding (trl's best-fit-decreasing packing: several rows per
sequence of up to MAX_LENGTH tokens, so `batch_size` then counts packed sequences), a step is split
into as many micro-batches as the free GPU memory needs, and activations are recomputed in the
backward pass only where that buys larger micro-batches (training.batching). On CPU the frozen base
is bf16 where the CPU multiplies bf16 natively (1.6x faster per step than fp32 on AVX512-BF16), else
fp32, batches are padded unless `packing=True`, and the LM head projects only the completion
positions (training.completion_head: trl's CPU fallback scores every position). The LoRA weights
stay fp32 (peft's default). Runs are seeded.

The adapter is saved under a versioned name that is never reused,
`<base>-<UTC timestamp>-<data hash[:8]>`: serving stacks such as vLLM cache adapter weights by
name, so reusing one would serve stale weights. Training writes to a hidden `.partial` directory
that is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from store.db import Database
from training import varlen
from training.batching import BatchPlan, ModelShape, plan_step
from training.completion_head import use_completion_head
from training.dataset import CARD_FILE, HOLDOUT_FILE, TRAIN_FILE, DatasetCard, read_rows
from training.evaluate import (
    METRICS_FILE,
    completion_loss,
    device_and_dtype,
    load_causal_lm,
    load_tokenizer,
    perplexity,
    release_memory,
)
from training.registry import AdapterNameTaken, adapter_name, name_taken, register_adapter

log = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_LENGTH = 1024
DEFAULT_MAX_STEPS = 60
SDPA_PACKED_ROWS = 4  # packed sequences per SDPA pass (see _cuda_step_plan)


@dataclass
class TrainResult:
    adapter_dir: Path
    name: str
    metrics: dict[str, Any]
    adapter_id: str | None = None  # the `adapters` row, when a database was given


def train_lora(
    data_dir: Path,
    out_root: Path,
    *,
    base_model_dir: Path,
    base_name: str | None = None,
    max_steps: int | None = None,
    epochs: float | None = None,
    learning_rate: float = 2e-4,
    batch_size: int = 4,
    lora_r: int = 16,
    lora_dropout: float = 0.05,
    seed: int = 0,
    load_in_4bit: bool = False,
    packing: bool | None = None,
    attention: str | None = None,
    torch_compile: bool = False,
    db: Database | None = None,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `data_dir`/train.jsonl and save it under `out_root`/<versioned name>.

    Trains for `max_steps` optimizer steps or for `epochs` passes over the rows; when both are
    given `max_steps` wins (as in transformers, where max_steps > 0 overrides num_train_epochs);
    with neither, DEFAULT_MAX_STEPS. `batch_size` is the effective batch: rows per optimizer step,
    or packed sequences when packing (the default on CUDA; `packing=False` pads there too).
    `attention` names the packed batches' attention implementation ("sdpa", "flash_attention_2",
    training.varlen.NAME...; default: the fastest this machine has). `torch_compile` runs the
    model under torch.compile (transformers' option of that name): fewer, fused kernels once
    compiled, for a compile time up front; off by default (docs/BENCHMARKS.md, "GPU training").
    `lora_dropout` is the dropout on the adapters' inputs (peft's); 0 skips its kernels and its
    saved masks, as Unsloth's default does, at the cost of that regularisation.
    `callbacks` are transformers `TrainerCallback`s for the trainer (bench/gpu_train.py times steps).
    """
    import torch
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    schedule = _schedule(max_steps, epochs)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    started = time.perf_counter()
    data_dir, out_root = Path(data_dir), Path(out_root)
    # The base's directory name is its served name (the default is converted into a directory named
    # after the model), so an adapter is named and registered after the base it was really trained on.
    base_name = base_name or Path(base_model_dir).name
    train_rows, holdout_rows = read_rows(data_dir / TRAIN_FILE), read_rows(data_dir / HOLDOUT_FILE)
    if not train_rows:
        raise ValueError(f"{data_dir / TRAIN_FILE} has no rows")
    data_hash = dataset_hash(data_dir)
    name = adapter_name(base_name, data_hash)
    final_dir = out_root / name
    if final_dir.exists() or (db is not None and name_taken(db, name)):
        raise AdapterNameTaken(f"adapter name {name!r} is already used; names are never reused")
    out_root.mkdir(parents=True, exist_ok=True)
    work_dir = out_root / f".{name}.partial"
    work_dir.mkdir()  # fails if a concurrent run claimed the same name

    # The process may have run other stages before (the flow builds the dataset first): whether the
    # process's peak RSS grew while training says whose peak the metrics report.
    peak_before = _lifetime_peak_rss_mb()
    try:
        device, dtype = device_and_dtype()
        on_cuda = device.type == "cuda"
        attention = _packing_attention(on_cuda, packing, attention)
        plan = BatchPlan(per_device=batch_size, accumulation=1, checkpointing=False)
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
            plan = _cuda_step_plan(
                base_model_dir, batch_size, lora_r, load_in_4bit, attention, adapter_dropout=lora_dropout > 0
            )
        set_seed(seed)
        tokenizer = load_tokenizer(base_model_dir)
        model = _load_base(base_model_dir, device, dtype, load_in_4bit, attention, plan.checkpointing)
        model.eval()
        with torch.inference_mode():
            base_loss, holdout_tokens = _holdout_loss(model, tokenizer, holdout_rows)

        config = SFTConfig(
            output_dir=str(work_dir / "trainer"),
            **schedule,
            per_device_train_batch_size=plan.per_device,
            gradient_accumulation_steps=plan.accumulation,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=0.1,
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            seed=seed,
            data_seed=seed,
            bf16=dtype == torch.bfloat16,
            fp16=on_cuda and dtype == torch.float16,
            use_cpu=not on_cuda,
            activation_checkpointing=plan.checkpointing,
            completion_only_loss=True,
            max_length=MAX_LENGTH,
            **({"packing": True, "packing_strategy": "bfd", "padding_free": True} if attention else {}),
            torch_compile=torch_compile,
            disable_tqdm=False,
        )
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=_as_dataset(train_rows),
            processing_class=tokenizer,
            peft_config=LoraConfig(
                r=lora_r,
                lora_alpha=2 * lora_r,
                lora_dropout=lora_dropout,
                target_modules=LORA_TARGETS,
                task_type="CAUSAL_LM",
            ),
            callbacks=callbacks,
        )
        if not on_cuda and not use_completion_head(trainer.model.get_base_model()):
            log.info("training: trl's own LM head scores every position (no completion-only head for this model)")
        with adapter_inputs_left_to_autocast(trainer.model, mixed_precision=on_cuda and dtype != torch.float32):
            output = trainer.train()
        trained = trainer.model
        trained.eval()
        with torch.inference_mode():
            adapter_loss, _ = _holdout_loss(trained, tokenizer, holdout_rows)

        trained.save_pretrained(str(work_dir))
        tokenizer.save_pretrained(str(work_dir))
        shutil.rmtree(work_dir / "trainer", ignore_errors=True)
        log_history, train_output = trainer.state.log_history, output.metrics
        # Nothing of the model may outlive this call: the offline gate loads its own copy next.
        del trainer, trained, model, output
        release_memory()
        metrics = _metrics(
            log_history,
            train_output,
            name=name,
            base_name=base_name,
            base_model_dir=base_model_dir,
            data_dir=data_dir,
            data_hash=data_hash,
            rows=(len(train_rows), len(holdout_rows)),
            holdout=(base_loss, adapter_loss, holdout_tokens),
            params={
                "max_steps": schedule["max_steps"],
                "epochs": schedule.get("num_train_epochs"),
                "learning_rate": learning_rate,
                "batch_size": batch_size,
                "per_device_batch_size": plan.per_device,
                "gradient_accumulation_steps": plan.accumulation,
                "packing": attention is not None,
                "attention": attention or "default",
                "lora_r": lora_r,
                "lora_alpha": 2 * lora_r,
                "lora_dropout": lora_dropout,
                "lora_targets": LORA_TARGETS,
                "seed": seed,
                "load_in_4bit": load_in_4bit,
                "torch_compile": torch_compile,
                "device": device.type,
                "dtype": str(dtype).removeprefix("torch."),
                "gradient_checkpointing": plan.checkpointing,
                "max_length": MAX_LENGTH,
            },
            on_cuda=on_cuda,
            peak_before_mb=peak_before,
            wall_time_s=time.perf_counter() - started,
        )
        (work_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        if final_dir.exists():
            raise AdapterNameTaken(f"adapter directory {final_dir} appeared while training")
        os.rename(work_dir, final_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise

    adapter_id = None
    if db is not None:
        adapter_id = register_adapter(
            db, name=name, base_model=base_name, path=final_dir, dataset_hash=data_hash, train_metrics=metrics
        )
    log.info("adapter %s saved to %s", name, final_dir)
    return TrainResult(adapter_dir=final_dir, name=name, metrics=metrics, adapter_id=adapter_id)


def dataset_hash(data_dir: Path) -> str:
    """The dataset card's content hash, or a hash of the split files when there is no card."""
    if (Path(data_dir) / CARD_FILE).is_file():
        return DatasetCard.load(data_dir).content_hash
    digest = hashlib.sha256()
    for name in (TRAIN_FILE, HOLDOUT_FILE):
        path = Path(data_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\x00" + path.read_bytes())
    return digest.hexdigest()


def _schedule(max_steps: int | None, epochs: float | None) -> dict[str, Any]:
    """SFTConfig's length of training: steps, or epochs when only they are given."""
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    if epochs is not None and epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if max_steps is None and epochs is not None:
        return {"max_steps": -1, "num_train_epochs": float(epochs)}
    if epochs is not None:
        log.warning("both max_steps (%d) and epochs (%s) given: max_steps wins", max_steps, epochs)
    return {"max_steps": max_steps if max_steps is not None else DEFAULT_MAX_STEPS}


def _cuda_step_plan(
    base_model_dir: Path,
    batch_size: int,
    lora_r: int,
    load_in_4bit: bool,
    attention: str | None,
    adapter_dropout: bool = True,
) -> BatchPlan:
    """Micro-batch, accumulation and recomputation for `batch_size` rows per step, from the free GPU memory."""
    import torch
    from transformers import AutoConfig

    shape = ModelShape.from_config(AutoConfig.from_pretrained(str(base_model_dir)))
    free_bytes, _total = torch.cuda.mem_get_info()
    plan = plan_step(
        free_bytes,
        shape,
        seq_len=MAX_LENGTH,
        target_batch=batch_size,
        lora_r=lora_r,
        adapter_dropout=adapter_dropout,
        weight_bytes=0.55 if load_in_4bit else 2.0,  # NF4 with double-quantised scales; bf16
        # SDPA attends across a whole packed micro-batch under a block-diagonal mask: its work and
        # the mask grow with the square of the micro-batch's tokens, so passes stay short there.
        max_per_device=SDPA_PACKED_ROWS if attention == "sdpa" else None,
    )
    log.info(
        "CUDA batch: %d rows per pass x %d accumulation, activations %s (%.1f GiB free)",
        plan.per_device,
        plan.accumulation,
        "recomputed" if plan.checkpointing else "kept",
        free_bytes / 2**30,
    )
    return plan


def _packing_attention(on_cuda: bool, packing: bool | None, attention: str | None = None) -> str | None:
    """The attention implementation for padding-free (packed) batches, or None to pad.

    Packed rows share one sequence and are told apart by their boundaries, which trl's collator
    passes beside the position ids. FlashAttention's variable-length kernels take the boundaries
    directly: the flash-attn package's (3, then 2), else PyTorch's own (training.varlen). SDPA and
    eager attention honour the position ids through the block-diagonal mask transformers builds
    when there is no attention mask and no cache (trl's SFTTrainer turns the cache off in its loss:
    tests/training/test_packing.py checks that packed and padded batches give the same loss).
    Packing is the default on CUDA; on CPU batches stay padded unless asked (the CPU path's results
    predate packing). `attention` names the implementation instead of choosing the fastest.
    """
    if packing is False or (packing is None and not on_cuda):
        return None
    if attention is not None:
        return varlen.register() if attention == varlen.NAME else attention
    if on_cuda:
        from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

        if is_flash_attn_3_available():
            return "flash_attention_3"
        if is_flash_attn_2_available():
            return "flash_attention_2"
        if varlen.available():
            return varlen.register()
    return "sdpa"


_NO_CUDA_FOR_4BIT = "load_in_4bit needs a CUDA GPU; on CPU train the unquantised base instead"
_NO_BITSANDBYTES = "load_in_4bit needs bitsandbytes: pip install 'abloop[gpu]'"


def check_4bit_possible() -> None:
    """Refuse 4-bit training where `train_lora` would refuse it, before a caller builds anything for it."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ValueError(_NO_CUDA_FOR_4BIT)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(_NO_BITSANDBYTES)


def _load_base(
    base_model_dir: Path, device: Any, dtype: Any, load_in_4bit: bool, attention: str | None, checkpointing: bool
) -> Any:
    extra = {"attn_implementation": attention} if attention else {}
    if not load_in_4bit:
        return load_causal_lm(base_model_dir, device=device, dtype=dtype, **extra)
    if device.type != "cuda":
        raise ValueError(_NO_CUDA_FOR_4BIT)
    return load_quantised_base(base_model_dir, dtype, device_map={"": 0}, checkpointing=checkpointing, **extra)


def load_quantised_base(base_model_dir: Path, dtype: Any, *, device_map: Any, checkpointing: bool, **extra: Any) -> Any:
    """The base quantised to 4-bit NF4 with double-quantised scales (QLoRA), ready for LoRA training.

    `train_lora` places it on the GPU; bitsandbytes' CPU backend loads it too (its matmuls are slow
    there, which is why training refuses 4-bit on CPU), so the tests run this path without one.
    """
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it importable for 4-bit loading)
    except ImportError as exc:
        raise ImportError(_NO_BITSANDBYTES) from exc
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = load_causal_lm(
        base_model_dir, dtype=dtype, quantization_config=quantization, device_map=device_map, **extra
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)


def adapter_inputs_left_to_autocast(model: Any, *, mixed_precision: bool) -> Any:
    """Training under autocast: peft's cast of each adapter's input to its fp32 weights turned off.

    peft casts every LoRA projection's input to the adapter's dtype (fp32, its default beside a bf16
    base), and autocast casts it straight back to bf16 for the adapter's matmul: two full-size copies
    per projection and step, and their backward, for the same numbers (the adapters' weights stay
    fp32; bench/lora_ops.py counts the operators saved). CUDA only: the CPU path's results stay as
    they were.
    """
    import contextlib

    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model) if mixed_precision else contextlib.nullcontext()


def _as_dataset(rows: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    def _plain(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
        # Only role and content: extra keys would vary between rows and break the Arrow schema.
        return [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in messages]

    return Dataset.from_list([{"prompt": _plain(r["prompt"]), "completion": _plain(r["completion"])} for r in rows])


def _holdout_loss(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> tuple[float | None, int]:
    if not rows:
        return None, 0
    return completion_loss(model, tokenizer, rows, max_length=MAX_LENGTH)


def _metrics(
    log_history: list[dict[str, Any]],
    train_output: dict[str, Any],
    *,
    name: str,
    base_name: str,
    base_model_dir: Path,
    data_dir: Path,
    data_hash: str,
    rows: tuple[int, int],
    holdout: tuple[float | None, float | None, int],
    params: dict[str, Any],
    on_cuda: bool,
    peak_before_mb: float,
    wall_time_s: float,
) -> dict[str, Any]:
    import torch

    curve = [{"step": e["step"], "loss": e["loss"]} for e in log_history if "loss" in e and "step" in e]
    train_tokens = max((e.get("num_tokens", 0) for e in log_history), default=0)
    runtime = float(train_output.get("train_runtime") or 0.0)
    base_loss, adapter_loss, holdout_tokens = holdout
    if on_cuda:
        peak_mb, peak_kind = torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    else:
        peak_mb = _lifetime_peak_rss_mb()
        # "rss": training set the process's peak, so it is training's own; otherwise an earlier stage
        # of this process peaked higher and training's own peak is at most this.
        peak_kind = "rss" if peak_mb > peak_before_mb else "rss_process_lifetime"
    return {
        "name": name,
        "base_model": base_name,
        "base_model_dir": str(base_model_dir),
        "data_dir": str(data_dir),
        "dataset_hash": data_hash,
        "train_rows": rows[0],
        "holdout_rows": rows[1],
        "params": params,
        "train_loss_curve": curve,
        "train_loss_final": curve[-1]["loss"] if curve else None,
        "holdout": {
            "tokens": holdout_tokens,
            "loss_base": base_loss,
            "loss_adapter": adapter_loss,
            "perplexity_base": perplexity(base_loss) if base_loss is not None else None,
            "perplexity_adapter": perplexity(adapter_loss) if adapter_loss is not None else None,
        },
        "train_tokens": int(train_tokens),
        "train_runtime_s": round(runtime, 2),
        "tokens_per_s": round(train_tokens / runtime, 1) if runtime > 0 else None,
        "peak_memory_mb": round(peak_mb, 1),
        "peak_memory_kind": peak_kind,
        "wall_time_s": round(wall_time_s, 2),
        "versions": _versions(),
    }


def _lifetime_peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux. Not reset on purpose: /proc/self/clear_refs would also wipe the
    # peak that tools outside the process (time -v, wait4) read.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "peft", "trl"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found
