"""Micro-batching benchmark: one forward pass per query vs BatchingEmbedder, at several concurrencies.

    .venv/bin/python bench/embed_batching.py [--queries N] [--concurrency 1,8,32,64] [--rounds R]
                                             [--query-chars 200] [--max-batch 64] [--threads T]

Loads the real embedding model once and measures both modes in the same process. Queries are
the first --query-chars characters of Python's bundled documentation topics (pydoc_data.topics).
Modes alternate cell by cell for --rounds rounds, so drift in background load hits both alike;
queries/s is the median over rounds, latency percentiles pool every request of a cell. Each cell
sends --queries requests from `concurrency` closed-loop clients; where concurrency >= queries the
cell is one burst of simultaneous requests rather than a steady state.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

# Runnable as a plain script from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from store.config import OFFLINE_ENV  # noqa: E402

for _name, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_name, _value)

import numpy as np  # noqa: E402

from retrieval.embedder import BatchingEmbedder, Embedder  # noqa: E402

EmbedOne = Callable[[str], Awaitable[np.ndarray]]
UNBATCHED = "one pass per query"
BATCHED = "BatchingEmbedder"


@dataclass
class Cell:
    """Every round's measurements for one (mode, concurrency)."""

    mode: str
    concurrency: int
    round_qps: list[float] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    forward_passes: int = 0
    queries: int = 0

    @property
    def qps(self) -> float:
        return statistics.median(self.round_qps)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000)


def main() -> None:
    args = _parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    queries = _queries(args.queries, args.query_chars)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from store.config import default_embedding_model

    started = time.perf_counter()
    embedder = Embedder(default_embedding_model())
    load_s = time.perf_counter() - started
    # Warm-up at both batch shapes: first passes allocate buffers and pick kernels.
    embedder.encode(queries[:1])
    embedder.encode(queries[: args.max_batch])

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    cells = asyncio.run(_run_all(embedder, queries, concurrencies, args.max_batch, args.rounds))
    run_s = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    print(_report(args, embedder, load_s, run_s, cells, concurrencies, (load_before, load_after)))


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=64, help="queries per cell per round")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated concurrent clients")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over all cells")
    parser.add_argument("--query-chars", type=int, default=200, help="characters of each pydoc topic used")
    parser.add_argument("--max-batch", type=int, default=64, help="BatchingEmbedder max_batch")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return parser.parse_args()


def _queries(n: int, chars: int) -> list[str]:
    from pydoc_data.topics import topics

    texts = [" ".join(text.split())[:chars] for _, text in sorted(topics.items()) if text.strip()]
    return [texts[i % len(texts)] for i in range(n)]


async def _run_all(
    embedder: Embedder, queries: list[str], concurrencies: list[int], max_batch: int, rounds: int
) -> dict[tuple[str, int], Cell]:
    cells: dict[tuple[str, int], Cell] = {}
    for _ in range(rounds):
        for concurrency in concurrencies:
            for mode in (UNBATCHED, BATCHED):
                cell = cells.setdefault((mode, concurrency), Cell(mode, concurrency))
                if mode == UNBATCHED:
                    wall, latencies, passes = await _unbatched(embedder, queries, concurrency)
                else:
                    wall, latencies, passes = await _batched(embedder, queries, concurrency, max_batch)
                cell.round_qps.append(len(queries) / wall)
                cell.latencies_s += latencies
                cell.forward_passes += passes
                cell.queries += len(queries)
    return cells


async def _unbatched(embedder: Embedder, queries: list[str], concurrency: int) -> tuple[float, list[float], int]:
    """One forward pass per request, serialised by a lock, in one worker thread (like the batcher)."""
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    lock = asyncio.Lock()
    loop = asyncio.get_running_loop()
    passes = 0

    async def embed_one(text: str) -> np.ndarray:
        nonlocal passes
        async with lock:
            passes += 1
            vectors = await loop.run_in_executor(executor, embedder.encode, [text])
        return vectors[0]

    try:
        wall, latencies = await _drive(embed_one, queries, concurrency)
    finally:
        executor.shutdown()
    return wall, latencies, passes


async def _batched(
    embedder: Embedder, queries: list[str], concurrency: int, max_batch: int
) -> tuple[float, list[float], int]:
    batcher = BatchingEmbedder(embedder, max_batch=max_batch)
    await batcher.start()
    try:
        wall, latencies = await _drive(batcher.embed, queries, concurrency)
    finally:
        await batcher.stop()
    return wall, latencies, batcher.batches


async def _drive(embed_one: EmbedOne, queries: list[str], concurrency: int) -> tuple[float, list[float]]:
    """`concurrency` closed-loop clients share the query list; latency includes queueing."""
    pending = iter(queries)
    latencies: list[float] = []

    async def client() -> None:
        for text in pending:
            t0 = time.perf_counter()
            await embed_one(text)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def _report(
    args: argparse.Namespace,
    embedder: Embedder,
    load_s: float,
    run_s: float,
    cells: dict[tuple[str, int], Cell],
    concurrencies: list[int],
    loadavg: tuple[float, float],
) -> str:
    import torch

    command = " ".join(["bench/embed_batching.py", *map(shlex.quote, sys.argv[1:])])
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        "## Embedding micro-batching",
        "",
        f"Command: `.venv/bin/python {command}`  ",
        f"Machine: {_cpu_model()}, {os.cpu_count()} cores ({usable} usable), "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, device {embedder.device}, "
        f"Python {platform.python_version()}; 1-min load average {loadavg[0]:.1f} before, "
        f"{loadavg[1]:.1f} after (other work on the machine skews absolute numbers)  ",
        f"Model: {Path(embedder.model_name_or_path).name} (dim {embedder.dim}), loaded in {load_s:.1f}s; "
        f"queries: first {args.query_chars} chars of pydoc topics; {args.rounds} rounds x {args.queries} "
        f"queries per cell; max_batch {args.max_batch}; measured in {run_s:.0f}s",
        "",
        "| concurrency | mode | queries/s (median of rounds) | p50 ms | p95 ms | forward passes | mean batch |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for concurrency in concurrencies:
        for mode in (UNBATCHED, BATCHED):
            c = cells[(mode, concurrency)]
            lines.append(
                f"| {concurrency} | {mode} | {c.qps:.1f} | {c.percentile_ms(50):.0f} | "
                f"{c.percentile_ms(95):.0f} | {c.forward_passes} | {c.queries / c.forward_passes:.1f} |"
            )
    lines += [
        "",
        "| concurrency | throughput, batched / one pass per query | p95 latency, batched / one pass per query |",
        "|---:|---:|---:|",
    ]
    for concurrency in concurrencies:
        single, batched = cells[(UNBATCHED, concurrency)], cells[(BATCHED, concurrency)]
        lines.append(
            f"| {concurrency} | {batched.qps / single.qps:.2f}x | "
            f"{batched.percentile_ms(95) / single.percentile_ms(95):.2f}x |"
        )
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
