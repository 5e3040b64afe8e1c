"""`abloop demo`: the loop end to end on the embedded defaults, on one machine, no GPU.

1. index the bundled corpus (the `ingest` flow, a real Prefect run);
2. start the embedded model server (SmolLM2-135M-Instruct) for both arms and the proxy;
3. send real queries through the proxy and print which arm answered what;
4. add SIMULATED traffic and feedback with a clear house style (no person rated anything);
5. retrain (the `retrain` flow): dataset -> LoRA adapter -> offline gate -> adapter hot-loaded on
   the model server -> a new experiment with the adapter as candidate;
6. send the same queries again: the candidate arm now answers in the house style, and run the
   `evaluate_arms` flow (a handful of requests is honestly "not enough data").

Everything simulated is labelled so in the store: user ids start with `sim-`, the session is
"simulated", and feedback comments say "simulated".
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


def run_demo(simulated_queries: int = 400, max_steps: int = 30) -> None:
    from flows.evaluate_arms import evaluate_arms
    from flows.ingest import ingest
    from flows.retrain import retrain
    from retrieval.index import IndexStore
    from store.config import Settings
    from store.db import Database
    from training.simulate import simulate_traffic

    settings = Settings()
    work = Path(".abloop-demo")
    # Three processes share the CPU (model server, proxy, trainer); one intra-op thread each
    # keeps them from waiting on each other (bench/train_throughput.py, bench/proxy_overhead.py).
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    model_base = f"http://127.0.0.1:{MODEL_PORT}/v1"
    admin_token = secrets.token_urlsafe(16)

    current = IndexStore(settings.index_dir).current_version()
    if current is None:
        print("1/6 indexing the bundled corpus (Python's documentation topics) with the `ingest` flow")
        built = ingest(corpus="pydoc")
        print(f"    index {built['index_version']}: {built['chunks']} chunks")
    else:
        print(f"1/6 using index {current} in {settings.index_dir} (`abloop index build` makes a new version)")

    print(f"2/6 starting the embedded model server on :{MODEL_PORT} (SmolLM2-135M-Instruct, CPU)")
    with _background("model-server", [*_cli(), "serve-model", "--port", str(MODEL_PORT)], env,
                     f"http://127.0.0.1:{MODEL_PORT}/healthz", work):
        proxy_env = env | {
            "LLM_API_BASE": model_base,
            "LLM_API_BASE_NEW_MODEL": model_base,  # candidate = base until an adapter exists
            "CANDIDATE_SHARE": "0.5",
            "ADMIN_TOKEN": admin_token,
            "LLM_MAX_TOKENS": "96",  # short answers keep the demo quick on a CPU
            "INDEX_DIR": str(settings.index_dir),
        }
        print(f"    starting the proxy on :{PROXY_PORT} (50% of users on the candidate arm)")
        with (
            _background("proxy", [*_cli(), "proxy", "--port", str(PROXY_PORT)], proxy_env,
                        f"http://127.0.0.1:{PROXY_PORT}/readyz", work),
            httpx.Client(base_url=f"http://127.0.0.1:{PROXY_PORT}", timeout=300) as client,
        ):
            # A fresh experiment each run: an earlier run's candidate adapter died with its server.
            model = httpx.get(f"{model_base}/models", timeout=30).json()["data"][0]["id"]
            client.put("/api/v1/admin/experiment", headers={"Authorization": f"Bearer {admin_token}"},
                       json={"candidate": {"base_url": model_base, "model": model}, "candidate_share": 0.5},
                       ).raise_for_status()
            print("3/6 real queries through the proxy (both arms serve the base model)")
            _round(client)

            print(f"4/6 adding {simulated_queries} SIMULATED searches with SIMULATED feedback (house style:"
                  " 'Answer: <sentence>' + 'Source: <title>')")
            written = simulate_traffic(Database(settings.database_url), n_queries=simulated_queries, seed=0, top_k=1)
            print(f"    simulated rows written: {written}")

            print(f"5/6 the `retrain` flow: dataset -> LoRA ({max_steps} steps, CPU) -> offline gate -> candidate")
            outcome = retrain(candidate_server=model_base, candidate_share=0.5, days=7, max_steps=max_steps,
                              learning_rate=1e-3)
            if outcome["status"] != "candidate":
                print(f"    no new candidate: {outcome['status']} ({outcome.get('reason') or outcome.get('gate')})")
                return
            gate = outcome["gate"]
            print(f"    adapter {outcome['adapter']['name']}: holdout loss {gate['holdout']['loss_base']:.3f}"
                  f" -> {gate['holdout']['loss_adapter']:.3f}")
            time.sleep(settings.experiment_refresh_s * 2)  # the proxy picks the experiment up on its own

            print("6/6 the same queries again: candidate = the new adapter, control = the base model")
            _round(client, user_prefix="sim-user-after-")
            analysis = evaluate_arms()
            print(f"\nevaluate_arms on the new experiment: {analysis['decision']['action']} - "
                  f"{analysis['decision']['reason']}")
            print(f"\nlogs: {work}/; store: {settings.database_url}; run `abloop status` for counts")


def _round(client: httpx.Client, user_prefix: str = "sim-user-") -> None:
    for n, query in enumerate(QUERIES):
        result = _ask(client, f"{user_prefix}{n}", query)
        _show(result, query)
        thumbs = "up" if result["items"] else "down"
        client.post("/api/v1/feedback", json={"request_id": result["request_id"], "thumbs": thumbs,
                                              "comment": "simulated feedback (abloop demo)"})
