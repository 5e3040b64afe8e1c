"""Where a LoRA training step's time goes on a GPU: kernel launch cost, and a profile of a few steps.

bench/gpu_train.py measured about 0.3 s per step for every model size on an H200 (135M to 1.7B, the
project and trl's defaults alike): a cost that does not grow with the model. This script tells a
launch-bound step from a compute-bound one:

1. launch cost: the time per launch of a tiny kernel issued back to back (eager), against the same
   kernels replayed from a CUDA graph;
2. a profile (torch.profiler) of `--profile` steps after `--skip` warm-up steps of
   training.train.train_lora as `abloop train` runs it (`--size`, `--batch`): the busiest operators
   by self CPU time and by GPU time, kernel launches per step, and the GPU's busy share of the step.

    python3 bench/gpu_profile.py --size 1.7B                 # there, with bench/.carry carried (~2 min)
    python3 bench/gpu_profile.py --size 1.7B --compile --skip 12   # the same step under torch.compile
    python bench/gpu_profile.py --device cpu --size smoke    # the wiring, on CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# bench.gpu_train imports only the standard library at module level: nothing else may load before the wheels.
from bench.gpu_train import BUNDLE, SHAPES, build_model, start_offline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--size", choices=tuple(SHAPES), default="1.7B")
    parser.add_argument("--batch", type=int, default=4, help="the project's packed sequences per step")
    parser.add_argument("--skip", type=int, default=8, help="steps before the profile")
    parser.add_argument("--profile", type=int, default=3, help="steps profiled")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--compile", action="store_true", help="profile the step under torch.compile")
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    args = parser.parse_args()
    start_offline(args.bundle)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.device == "cuda":
        _launch_cost()
    _profile_training(args)


def _launch_cost(launches: int = 20_000) -> None:
    import torch

    x = torch.zeros(16, device="cuda")
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(launches):
        x.add_(1)
    torch.cuda.synchronize()
    eager_us = (time.perf_counter() - started) / launches * 1e6

    graph, per_graph = torch.cuda.CUDAGraph(), 100
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            x.add_(1)  # warm-up on the side stream, as capture asks
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            x.add_(1)
    graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(launches // per_graph):
        graph.replay()
    torch.cuda.synchronize()
    graph_us = (time.perf_counter() - started) / launches * 1e6
    print(
        f"launch cost on {torch.cuda.get_device_name()}: {eager_us:.2f} us per eager launch of a 16-element add, "
        f"{graph_us:.2f} us per kernel replayed from a CUDA graph ({launches:,} launches each)",
        flush=True,
    )


def _profile_training(args: argparse.Namespace) -> None:
    import torch
    from transformers import TrainerCallback

    from bench.train_throughput import build_data
    from training.train import train_lora

    on_cuda = args.device == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    profiler = torch.profiler.profile(activities=activities)
    window: dict[str, float] = {}

    class Profile(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            if state.global_step == args.skip:
                if on_cuda:
                    torch.cuda.synchronize()
                profiler.start()
                window["started"] = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step == args.skip + args.profile and "started" in window:
                if on_cuda:
                    torch.cuda.synchronize()
                window["wall_s"] = time.perf_counter() - window["started"]
                profiler.stop()

    with tempfile.TemporaryDirectory(prefix="abloop-gpu-profile-") as scratch:
        data = build_data(Path(scratch), args.rows, 0, 5)
        model_dir = Path(scratch) / f"llama-{args.size}"
        build_model(args.size, model_dir, seed=0, device=args.device, bundle=args.bundle)
        train_lora(
            data,
            Path(scratch) / "adapters",
            base_model_dir=model_dir,
            max_steps=args.skip + args.profile,
            batch_size=args.batch,
            torch_compile=args.compile,
            callbacks=[Profile()],
        )
    _report(profiler, window["wall_s"], args, on_cuda)


def _report(profiler: Any, wall: float, args: argparse.Namespace, on_cuda: bool) -> None:
    events = profiler.key_averages()
    steps = args.profile
    # The runtime's launches and the driver's (cuBLAS's GEMMs go through cuLaunchKernelEx).
    launches = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    print(f"\n{args.size}, batch {args.batch}: {steps} steps profiled in {wall:.3f} s ({wall / steps:.3f} s per step)")
    if on_cuda:
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
        print(f"kernel launches per step: {launches / steps:,.0f}; GPU busy (summed kernel time) "
              f"{gpu_us / 1e6 / wall:.0%} of the wall time")  # fmt: skip
    for key, rows in (("self_device_time_total", 15), ("self_cpu_time_total", 20)) if on_cuda else (
        ("self_cpu_time_total", 20),
    ):
        try:  # one table failing (a profiler API change) must not lose the other
            print(events.table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"table by {key}: {exc!r}")


if __name__ == "__main__":
    main()
