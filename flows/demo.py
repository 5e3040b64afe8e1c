"""`abloop demo`: the loop end to end on the embedded defaults, on one machine, no GPU.

It starts the embedded model server (both arms), indexes the bundled corpus through the `ingest`
flow, starts the proxy, sends a handful of real queries and prints which arm answered what.
Feedback in the demo is SIMULATED (no person rated anything) and is labelled so in the store:
its user ids start with `sim-` and its comments say "simulated".
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

QUERIES = [
    "How do I open a file and make sure it is closed?",
    "What does the assert statement do?",
    "How do I write a for loop over a list?",
    "What is a lambda expression?",
    "How are exceptions raised and caught?",
    "What does the with statement do?",
]
MODEL_PORT = int(os.environ.get("ABLOOP_DEMO_MODEL_PORT", "8001"))
PROXY_PORT = int(os.environ.get("ABLOOP_DEMO_PROXY_PORT", "8000"))


def _cli() -> list[str]:
    return [sys.executable, "-m", "flows.cli"]


@contextmanager
def _background(name: str, args: list[str], env: dict[str, str], ready_url: str, log_dir: Path) -> Iterator[None]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(process, ready_url, log_path)
            yield
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_ready(process: subprocess.Popen, url: str, log_path: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{log_path.stem} exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{log_path.stem} not ready after {timeout_s:.0f}s; see {log_path}")


def _ask(client: httpx.Client, user: str, query: str) -> dict:
    response = client.post("/api/v1/search", json={"query": query, "user_id": user, "top_k": 3})
    response.raise_for_status()
    return response.json()


def _show(result: dict, query: str) -> None:
    answer = " ".join(result["answer"].split())
    source = result["items"][0]["title"] if result["items"] else "-"
    print(f"  [{result['arm']:>9} -> served by {result['served_arm']:<9}] model={result['model']}  "
          f"top passage={source}  {result['timings_ms']['total']:.0f} ms")
    print(f"    Q: {query}\n    A: {answer[:220]}{'…' if len(answer) > 220 else ''}")


def run_demo() -> None:
    from flows.ingest import ingest
    from store.config import Settings

    settings = Settings()
    work = Path(".abloop-demo")
    env = dict(os.environ)
    model_base = f"http://127.0.0.1:{MODEL_PORT}/v1"
    admin_token = secrets.token_urlsafe(16)

    print("1/4 indexing the bundled corpus (Python's documentation topics) with the `ingest` flow")
    built = ingest(corpus="pydoc")
    print(f"    index {built['index_version']}: {built['chunks']} chunks")

    print(f"2/4 starting the embedded model server on :{MODEL_PORT} (SmolLM2-135M-Instruct, CPU)")
    with _background("model-server", [*_cli(), "serve-model", "--port", str(MODEL_PORT)], env,
                     f"http://127.0.0.1:{MODEL_PORT}/healthz", work):
        proxy_env = env | {
            "LLM_API_BASE": model_base,
            "LLM_API_BASE_NEW_MODEL": model_base,  # candidate = base until an adapter exists
            "CANDIDATE_SHARE": "0.5",
            "ADMIN_TOKEN": admin_token,
            "INDEX_DIR": str(settings.index_dir),
        }
        print(f"3/4 starting the proxy on :{PROXY_PORT} (50% of users on the candidate arm)")
        with (
            _background("proxy", [*_cli(), "proxy", "--port", str(PROXY_PORT)], proxy_env,
                        f"http://127.0.0.1:{PROXY_PORT}/readyz", work),
            httpx.Client(base_url=f"http://127.0.0.1:{PROXY_PORT}", timeout=300) as client,
        ):
            print("4/4 real queries through the proxy; feedback below is SIMULATED")
            for n, query in enumerate(QUERIES):
                result = _ask(client, f"sim-user-{n}", query)
                _show(result, query)
                thumbs = "up" if result["items"] else "down"
                client.post("/api/v1/feedback", json={"request_id": result["request_id"], "thumbs": thumbs,
                                                      "comment": "simulated feedback (abloop demo)"})
            print(f"\nlogs: {work}/; store: {settings.database_url}; run `abloop status` for counts")
