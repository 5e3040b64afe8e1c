"""Several processes starting at once on an empty model cache: how long until all are ready, what CPU it took.

Each of --processes children is started at the same moment with the same fresh cache directory and asks
for what a first start builds: the converted SmolLM2 base (`serving.model.resolve_base_model`) or the ONNX
export of the embedding model (`retrieval.fast_embedder.export_onnx`). Run it against two checkouts in
one invocation to compare them side by side (a checkout's code is put first on the children's path):

    .venv/bin/python bench/first_start.py --code /tmp/before --code . [--processes 3] [--what model,embeddings]

The table: per checkout and cache directory, the wall time until the last child is ready, the children's
CPU time (user + system), and how many children built the directory themselves (logged "converting" /
"exporting").
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import sys, logging
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
cache = Path(sys.argv[2])
if sys.argv[1] == "model":
    from serving.model import resolve_base_model
    resolve_base_model(cache_dir=cache)
else:
    from retrieval.fast_embedder import export_onnx
    from store.config import default_embedding_model
    export_onnx(default_embedding_model(), cache)
"""
BUILT = {"model": "converting ", "embeddings": "exporting "}


def start_together(code: Path, what: str, processes: int) -> tuple[float, float, int]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(code.resolve()),
           "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="abloop-first-start-") as cache:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        children = [subprocess.Popen([sys.executable, "-c", _CHILD, what, cache], cwd=code, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                    for _ in range(processes)]
        outputs = [child.communicate()[0] for child in children]
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for child, output in zip(children, outputs, strict=True):
        if child.returncode != 0:
            raise SystemExit(f"a child failed ({code}, {what}):\n{output}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    built = sum(BUILT[what] in output for output in outputs)
    return wall, cpu, built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", action="append", type=Path, help="a checkout to run (repeatable; default: this one)")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--what", default="model,embeddings")
    args = parser.parse_args()
    codes = args.code or [ROOT]
    print(f"`python bench/first_start.py`, {args.processes} processes at once, {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}\n")
    print("| cache directory | checkout | wall s, until all ready | children's CPU s | built by |")
    print("|---|---|---:|---:|---:|")
    for what in args.what.split(","):
        for code in codes:
            wall, cpu, built = start_together(code, what, args.processes)
            print(f"| {what} | {code} | {wall:.1f} | {cpu:.1f} | {built} of {args.processes} |", flush=True)


if __name__ == "__main__":
    main()
