"""Training throughput: the project's LoRA settings versus trl's defaults, same data, one run each.

Measures training tokens/s (non-padding tokens the trainer saw / train runtime) and peak memory
(process RSS on CPU, torch.cuda.max_memory_allocated on CUDA) for SmolLM2-135M-Instruct. On CUDA
it also estimates model FLOPs utilisation, 6 * params * tokens/s / peak FLOP/s (the usual
dense-training approximation; a LoRA step skips the frozen weights' gradients, so its true
utilisation is about 2/3 of the figure shown).

Each configuration runs in its own subprocess so that peak memory is its own.

    python bench/train_throughput.py                       # CPU, a few steps (a few minutes)
    python bench/train_throughput.py --device cuda --bf16 --peak-tflops 989 --steps 50
    python bench/train_throughput.py --device cuda --bf16 --4bit --peak-tflops 989

Configurations:
  project       training.train.train_lora: LoRA r=16 on all linear layers, completion-only loss,
                bf16 where the CPU has it natively (else fp32), no activation checkpointing and the
                LM head on the completion positions only on CPU; bf16 on CUDA; batch 4.
  trl-defaults  SFTTrainer(model, SFTConfig(output_dir, max_steps)): full fine-tuning with trl's
                defaults (batch 8, lr 2e-5, bf16 autocast, activation checkpointing on).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script from anywhere: the repository root must win over any stale editable-install mapping.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from store.config import OFFLINE_ENV  # noqa: E402

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

CONFIGS = ("project", "trl-defaults")


def main() -> None:
    args = _parser().parse_args()
    if args._worker:
        print("RESULT " + json.dumps(_run_worker(args)), flush=True)
        return
    from serving.model import resolve_base_model

    base_dir = resolve_base_model(args.base)
    with tempfile.TemporaryDirectory(prefix="abloop-bench-") as scratch:
        data_dir = build_data(Path(scratch), args.rows, args.seed)
        results = [_spawn(config, args, base_dir, data_dir, Path(scratch)) for config in CONFIGS]
    print(_table(results, args))
    print("\ncommand: " + " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF dir")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true", help="CUDA: bf16 (the project uses it on CUDA anyway)")
    parser.add_argument("--4bit", dest="four_bit", action="store_true", help="CUDA: 4-bit base for the project run")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration")
    parser.add_argument("--rows", type=int, default=120, help="simulated queries to build the dataset from")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak TFLOP/s, for MFU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--_worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--_data", help=argparse.SUPPRESS)
    parser.add_argument("--_base_dir", help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    return parser


def build_data(scratch: Path, rows: int, seed: int, passages: int = 1) -> Path:
    """A simulated house-style dataset; short prompts (one passage) keep CPU steps affordable.

    `passages` per prompt: the search API serves 5 by default (`top_k`), about 300 tokens a row.
    """
    from abloop.simulate import simulate_traffic
    from store.db import Database
    from training.dataset import build_dataset
    from training.select import SelectionConfig

    db = Database(f"sqlite:///{scratch / 'bench.db'}")
    db.migrate()
    simulate_traffic(db, n_queries=rows, seed=seed, top_k=passages)
    # No embedding stages: the benchmark is about the trainer, not the dataset pipeline.
    build_dataset(db, scratch / "data", semantic_threshold=1.01, select=SelectionConfig(enabled=False))
    db.dispose()
    return scratch / "data"


def _spawn(config: str, args: argparse.Namespace, base_dir: Path, data_dir: Path, scratch: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--_worker",
        config,
        "--_data",
        str(data_dir),
        "--_base_dir",
        str(base_dir),
        "--_out",
        str(scratch / config),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--seed",
        str(args.seed),
    ]
    command += ["--bf16"] * args.bf16 + ["--4bit"] * args.four_bit
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    print(f"[bench] {config}: {args.steps} steps ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr[-4000:])
        return {"config": config, "error": f"exit {done.returncode}"}
    return json.loads(lines[-1][len("RESULT ") :])


def _run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    on_cuda = args.device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    started = time.perf_counter()
    if args._worker == "project":
        result = _project(args)
    else:
        result = run_trl_defaults(Path(args._data), Path(args._base_dir), Path(args._out), args.steps, on_cuda)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["threads"] = torch.get_num_threads()
    if on_cuda:
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["device_name"] = torch.cuda.get_device_name()
    else:
        result["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["params"] = _count_params(Path(args._base_dir))
    return result


def _project(args: argparse.Namespace) -> dict[str, Any]:
    from training.train import train_lora

    run = train_lora(
        Path(args._data),
        Path(args._out),
        base_model_dir=Path(args._base_dir),
        max_steps=args.steps,
        seed=args.seed,
        load_in_4bit=args.four_bit,
    )
    m = run.metrics
    p = m["params"]
    return {
        "config": "project",
        "mode": f"LoRA r={p['lora_r']}" + (" (4-bit base)" if p["load_in_4bit"] else ""),
        "dtype": p["dtype"],
        "checkpointing": p["gradient_checkpointing"],
        "batch": p["batch_size"],
        "steps": args.steps,
        "tokens": m["train_tokens"],
        "runtime_s": m["train_runtime_s"],
        "tokens_per_s": m["tokens_per_s"],
    }


def run_trl_defaults(
    data_dir: Path, base_dir: Path, out_dir: Path, steps: int, on_cuda: bool, callbacks: list[Any] | None = None
) -> dict[str, Any]:
    """`steps` of SFTTrainer with trl's defaults (a full fine-tune) on `data_dir`'s training rows.

    With `callbacks` (a timer), every step is logged, as the project's trainer does: trl's default
    logs every 10th, and a timer reads the token count from the logs.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from training.dataset import TRAIN_FILE, read_rows

    rows = read_rows(data_dir / TRAIN_FILE)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    # trl's defaults, except how long to run, no tracker and no checkpoint; use_cpu is required on a
    # CPU-only machine, where the default bf16 otherwise refuses to start.
    config = SFTConfig(
        output_dir=str(out_dir),
        max_steps=steps,
        report_to="none",
        save_strategy="no",
        use_cpu=not on_cuda,
        **({"logging_steps": 1} if callbacks else {}),
    )
    trainer = SFTTrainer(model=str(base_dir), args=config, train_dataset=dataset, callbacks=callbacks)
    output = trainer.train()
    tokens = max((e.get("num_tokens", 0) for e in trainer.state.log_history), default=0)
    tokens = tokens or trainer._total_train_tokens  # logged only every logging_steps
    runtime = float(output.metrics["train_runtime"])
    return {
        "config": "trl-defaults",
        "mode": "full fine-tune",
        "dtype": "bf16 autocast" if config.bf16 else "fp32",
        "checkpointing": bool(config.gradient_checkpointing),
        "batch": config.per_device_train_batch_size,
        "steps": steps,
        "tokens": int(tokens),
        "runtime_s": round(runtime, 2),
        "tokens_per_s": round(tokens / runtime, 1) if runtime else None,
    }


def _count_params(base_dir: Path) -> int:
    """Parameters stored in the checkpoint (tied embeddings counted once)."""
    import math

    from safetensors import safe_open

    total = 0
    for path in base_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())  # noqa: SIM118 (not a dict)
    return total


def _table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    header = (
        "| config | mode | dtype | act. ckpt | batch | steps | train tokens | tokens/s | peak mem (MB) "
        "| train s | wall s | MFU |"
    )
    columns = header.count("|") - 1
    lines = [header, "|" + "---|" * columns]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error']} |" + " |" * (columns - 2))
            continue
        mfu = "n/a (CPU)"
        if args.device == "cuda" and args.peak_tflops and r.get("tokens_per_s"):
            mfu = f"{6 * r['params'] * r['tokens_per_s'] / (args.peak_tflops * 1e12):.2%}"
        elif args.device == "cuda":
            mfu = "pass --peak-tflops"
        lines.append(
            f"| {r['config']} | {r['mode']} | {r['dtype']} | {'on' if r['checkpointing'] else 'off'} | {r['batch']} "
            f"| {r['steps']} | {r['tokens']} | {r['tokens_per_s']} | {r['peak_memory_mb']} | {r['runtime_s']} "
            f"| {r['wall_s']} | {mfu} |"
        )
    first = next((r for r in results if "error" not in r), {})
    device = first.get("device_name", f"CPU, {first.get('threads', '?')} torch thread(s)")
    return f"\nSmolLM2-135M-Instruct ({first.get('params', '?'):,} params) on {device}\n\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
