"""Peak memory of LoRA training inside the `retrain` flow against `abloop train` alone (issue 13).

Both run SmolLM2-135M-Instruct (`resolve_base_model("default")`) for the same number of steps on
the same rows, each in a fresh subprocess; the peak resident set size of each is what the kernel
reports for that child when it exits (`os.wait4`'s `ru_maxrss`: the largest RSS the process or any
descendant it waited for ever had). Steps:

1. a store of SIMULATED traffic (`abloop.simulate.simulate_traffic`), then `abloop dataset build`;
2. (a) `abloop train --data <that dataset> --max-steps N`;
3. (b) the `retrain` flow on the same store (it builds the same dataset again: the content hashes
   are printed), training for N steps, running the offline gate and registering the adapter; the
   candidate server is a stub (`serving.stub`) in this process that accepts `/load_lora_adapter`.

For (b) it also prints each flow task's resident memory before it, its own peak (sampled every
10 ms) and what it leaves resident: where the flow's memory goes.

    python bench/retrain_memory.py                 # 30 steps, ~190 rows: about 10 minutes on 2 CPU cores
    python bench/retrain_memory.py --steps 3       # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# Run as a script from anywhere: the repository root must win over any stale editable-install mapping.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from store.config import OFFLINE_ENV  # noqa: E402

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

GOAL_RATIO = 1.25


def main() -> None:
    args = _parser().parse_args()
    if args._worker:
        _run_flow_worker(args)
        return
    from serving.stub import running_stub

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="abloop-retrain-mem-") as tmp, running_stub() as (_stub, stub_url):
        scratch = Path(tmp)
        env = _env(scratch)
        _simulate(env["DATABASE_URL"], args.queries, args.seed)
        dataset_dir = scratch / "dataset"
        build = _measure("abloop dataset build", _cli("dataset", "build", "--out", str(dataset_dir)), env)
        alone = _measure(
            "(a) abloop train",
            _cli("train", "--data", str(dataset_dir), "--out", str(scratch / "alone"), "--max-steps", str(args.steps)),
            env,
        )
        flow = _measure(
            "(b) retrain flow",
            [sys.executable, __file__, "--_worker", "--steps", str(args.steps), "--_server", stub_url],
            env,
        )
        card = json.loads((dataset_dir / "card.json").read_text(encoding="utf-8"))
        outcome = json.loads(flow.pop("result") or "{}")
    print(_report(args, card, outcome, (build, alone, flow), (load_before, os.getloadavg())))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="LoRA optimizer steps in both runs")
    parser.add_argument("--queries", type=int, default=400, help="simulated searches (400 -> ~190 dataset rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_server", help=argparse.SUPPRESS)
    return parser


def _env(scratch: Path) -> dict[str, str]:
    return dict(
        os.environ,
        DATABASE_URL=f"sqlite:///{scratch / 'store.db'}",
        RUNS_DIR=str(scratch / "runs"),
        PREFECT_HOME=str(scratch / "prefect"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        CUDA_VISIBLE_DEVICES="",
        TQDM_DISABLE="1",
    )


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "abloop.cli", *args]


def _simulate(database_url: str, queries: int, seed: int) -> None:
    from abloop.simulate import simulate_traffic
    from store.db import Database

    db = Database(database_url)
    db.migrate()
    simulate_traffic(db, n_queries=queries, seed=seed, days=1.0)
    db.dispose()


def _measure(label: str, command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run `command` to completion; its own peak RSS comes from the kernel via wait4."""
    print(f"[bench] {label} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Drain both pipes in threads so a chatty child never blocks; wait4 reaps it and returns its rusage.
    chunks: dict[str, str] = {}

    def _drain(name: str, stream: Any) -> None:
        chunks[name] = stream.read()

    readers = [
        threading.Thread(target=_drain, args=(n, s)) for n, s in (("out", process.stdout), ("err", process.stderr))
    ]
    for reader in readers:
        reader.start()
    _pid, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join()
    if process.returncode != 0:
        sys.stderr.write(chunks.get("err", "")[-4000:])
        raise SystemExit(f"{label} failed: exit {process.returncode}")
    lines = [line for line in chunks.get("out", "").splitlines() if line.startswith("RESULT ")]
    return {
        "label": label,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "wall_s": time.perf_counter() - started,
        "result": lines[-1][len("RESULT ") :] if lines else None,
    }


def _run_flow_worker(args: argparse.Namespace) -> None:
    from store.config import apply_runtime_env

    apply_runtime_env()  # what `abloop` does before torch is imported, so both runs start alike
    import flows.retrain as module

    stages: list[dict[str, Any]] = []
    sampler = _RssSampler()
    for task in (module.build_training_data, module.train_adapter, module.gate_adapter):
        _meter(task, sampler, stages)
    outcome = module.retrain(candidate_server=args._server, days=2.0, max_steps=args.steps, min_examples=5)
    adapter = outcome.get("adapter") or {}
    metrics = adapter.get("metrics") or {}
    result = {
        "status": outcome["status"],
        "dataset_hash": (outcome.get("dataset") or {}).get("content_hash") or metrics.get("dataset_hash"),
        "gate_passed": (outcome.get("gate") or {}).get("passed"),
        "stages": stages,
    }
    print("RESULT " + json.dumps(result), flush=True)


class _RssSampler:
    """This process's resident set size every 10 ms, in a daemon thread; `peak` since `restart()`.

    Sampling leaves the kernel's own peak counter alone, which the parent reads for the whole flow
    (resetting it through /proc/self/clear_refs would wipe the earlier stages' peaks). Activations
    live for a whole forward and backward pass, seconds on CPU, so 10 ms sampling does not miss them.
    """

    def __init__(self) -> None:
        self._page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        self.peak = self.rss()
        threading.Thread(target=self._run, name="rss-sampler", daemon=True).start()

    def rss(self) -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * self._page_mb

    def restart(self) -> float:
        self.peak = self.rss()
        return self.peak

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.01)


def _meter(task: Any, sampler: _RssSampler, stages: list[dict[str, Any]]) -> None:
    """Record a flow task's resident memory before it, its own peak and what it leaves resident."""
    inner = task.fn

    def measured(*args: Any, **kwargs: Any) -> Any:
        before = sampler.restart()
        try:
            return inner(*args, **kwargs)
        finally:
            stage = {"task": task.name, "before_mb": before, "peak_mb": sampler.peak, "after_mb": sampler.rss()}
            stages.append(stage)

    task.fn = measured


def _report(
    args: argparse.Namespace,
    card: dict[str, Any],
    outcome: dict[str, Any],
    runs: tuple[dict[str, Any], ...],
    loads: tuple[tuple[float, ...], tuple[float, ...]],
) -> str:
    build, alone, flow = runs
    ratio = flow["peak_rss_mb"] / alone["peak_rss_mb"]
    lines = [
        f"\nSmolLM2-135M-Instruct, {args.steps} LoRA steps; dataset {card['content_hash'][:12]} "
        f"({card['counts']['train']} train / {card['counts']['holdout']} holdout rows, from {args.queries} "
        f"SIMULATED searches); the flow's dataset {str(outcome.get('dataset_hash'))[:12]}",
        f"load average (1 min) before / after: {loads[0][0]:.2f} / {loads[1][0]:.2f}; nproc {os.cpu_count()}",
        "",
        "| run | peak RSS (MB) | wall s | ÷ (a) |",
        "|---|---:|---:|---:|",
    ]
    for run in (build, alone, flow):
        share = run["peak_rss_mb"] / alone["peak_rss_mb"]
        lines.append(f"| {run['label']} | {run['peak_rss_mb']:,.0f} | {run['wall_s']:.0f} | {share:.2f}x |")
    if outcome.get("stages"):
        lines += [
            f"\n(b) stage by stage (flow status {outcome.get('status')}, gate passed: {outcome.get('gate_passed')}):",
            "",
            "| task | RSS before (MB) | own peak, sampled (MB) | RSS after (MB) |",
            "|---|---:|---:|---:|",
        ]
        for stage in outcome["stages"]:
            lines.append(
                f"| {stage['task']} | {stage['before_mb']:,.0f} | {stage['peak_mb']:,.0f} | {stage['after_mb']:,.0f} |"
            )
    verdict = "MET" if ratio <= GOAL_RATIO else "NOT MET"
    lines.append(f"\nretrain flow / abloop train alone: {ratio:.2f}x (goal <= {GOAL_RATIO}x): {verdict}")
    lines.append("command: " + " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
