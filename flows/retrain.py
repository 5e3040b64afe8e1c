"""retrain: logged traffic + feedback -> dataset -> LoRA adapter -> offline gate -> candidate arm.

Runs on the `gpu` work pool in production (prefect.yaml); on CPU it trains in fp32, small steps.
The adapter is hot-loaded on the candidate's OpenAI-compatible server under its versioned name
(vLLM's `/v1/load_lora_adapter`, which the embedded server speaks too) and a new experiment
starts with it as the candidate.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from prefect import flow, get_run_logger, task

from flows.observability import observed
from flows.parameters import AtLeastOne, Dropout, Positive, Share, Tolerance


@task(retries=2, retry_delay_seconds=10)
def build_training_data(database_url: str, out_dir: str, days: float) -> dict:
    from store.db import Database
    from training.dataset import build_dataset

    db = Database(database_url)
    since = datetime.now(UTC) - timedelta(days=days)
    return build_dataset(db, Path(out_dir), since=since).to_dict()


@task
def train_adapter(data_dir: str, out_root: str, base: str, database_url: str, *, max_steps: int | None,
                  epochs: float | None, learning_rate: float, batch_size: int, lora_dropout: float,
                  load_in_4bit: bool, torch_compile: bool) -> dict:
    from serving.model import resolve_base_model
    from store.db import Database
    from training.train import train_lora

    result = train_lora(Path(data_dir), Path(out_root), base_model_dir=resolve_base_model(base),
                        max_steps=max_steps, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                        lora_dropout=lora_dropout, load_in_4bit=load_in_4bit, torch_compile=torch_compile,
                        db=Database(database_url))
    return {"name": result.name, "adapter_dir": str(result.adapter_dir), "adapter_id": result.adapter_id,
            "metrics": result.metrics}


@task
def gate_adapter(data_dir: str, adapter_dir: str, base: str, database_url: str, answer_tolerance: float = 0.0) -> dict:
    from serving.model import resolve_base_model
    from store.db import Database
    from training.evaluate import evaluate_adapter

    report = evaluate_adapter(Path(data_dir), Path(adapter_dir), base_model_dir=resolve_base_model(base),
                              db=Database(database_url), answer_tolerance=answer_tolerance)
    return report.to_dict()


@task(retries=3, retry_delay_seconds=5)
def load_on_candidate_server(server_base_url: str, name: str, adapter_dir: str) -> None:
    response = httpx.post(f"{server_base_url.rstrip('/')}/load_lora_adapter",
                          json={"lora_name": name, "lora_path": str(Path(adapter_dir).resolve())}, timeout=300)
    if response.status_code != 200:
        raise RuntimeError(f"loading {name} failed: HTTP {response.status_code} {response.text[:300]}")


@task(retries=2, retry_delay_seconds=5)
def start_experiment(database_url: str, server_base_url: str, name: str, adapter_id: str | None,
                     share: float, rollout: dict | None = None) -> str:
    """A new experiment with the adapter as candidate: at `share`, or ramped by a rollout plan."""
    from experiment import lifecycle
    from store import experiments
    from store.config import Settings
    from store.db import Database

    db = Database(database_url)
    # A store no proxy has seeded yet has no running experiment: seed it as a proxy would (control
    # from LLM_API_BASE / LLM_MODEL) so that the candidate has a control to be compared with.
    experiments.ensure_running(db, Settings())
    experiment = lifecycle.start_candidate(db, base_url=server_base_url, model=name, adapter_id=adapter_id,
                                           share=0.0 if rollout else share, reason="retrained adapter")
    if rollout:
        lifecycle.set_rollout(db, experiment.id, rollout, reason="rollout of a retrained adapter")
    return experiment.id


@observed
@flow(name="retrain")
def retrain(
    candidate_server: str = "http://127.0.0.1:8001/v1",
    candidate_share: Share = 0.1,
    days: Positive = 7.0,
    max_steps: AtLeastOne | None = None,
    epochs: Positive | None = None,
    learning_rate: Positive = 2e-4,
    batch_size: AtLeastOne = 4,
    lora_dropout: Dropout = 0.05,
    load_in_4bit: bool = False,
    torch_compile: bool = False,
    min_examples: AtLeastOne = 20,
    min_holdout: AtLeastOne = 3,
    answer_tolerance: Tolerance = 0.0,
    base: str = "default",
    rollout: dict | None = None,
) -> dict:
    """Train for `max_steps` optimizer steps, or for `epochs` passes over the rows (neither: 60 steps;
    both: max_steps wins). Fewer than `min_examples` training rows or `min_holdout` holdout rows: nothing is
    trained, the run ends "skipped". `answer_tolerance`: how much lower the adapter's answers may score than the
    base's against the holdout's references (ROUGE-L, similarity) and still pass the gate. `load_in_4bit` (QLoRA)
    needs a CUDA worker with bitsandbytes; `torch_compile` is meant for one (on a CPU it costs more than it
    saves: docs/BENCHMARKS.md, "GPU training")."""
    from experiment.rollout import RolloutPlan
    from store.config import Settings

    # What would be refused after the dataset is built is refused now.
    if rollout:
        RolloutPlan.from_dict(rollout)
    if load_in_4bit:
        from training.train import check_4bit_possible

        check_4bit_possible()
    settings = Settings()
    log = get_run_logger()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    data_dir = settings.runs_dir / "datasets" / stamp
    card = build_training_data(settings.database_url, str(data_dir), days)
    train_rows, holdout_rows = card["counts"].get("train", 0), card["counts"].get("holdout", 0)
    log.info(f"dataset {card['content_hash'][:12]}: {train_rows} training rows, counts {card['counts']}")
    if train_rows < min_examples:
        log.info(f"not enough training rows ({train_rows} < {min_examples}); nothing trained")
        return {"status": "skipped", "reason": "not enough data", "dataset": card}
    # The offline gate compares base and adapter on the holdout only: on an empty one it cannot run (the
    # run would fail after training), and on one or two rows its verdict is one answer's luck. The split
    # is by a hash of the question (10% by default), so a dataset just over `min_examples` often holds out
    # 0-2 rows; like too few training rows, that is too little data, and nothing is trained. The default
    # of 3 is a floor that keeps small CPU runs possible (80 simulated queries: 27 training rows, 3 held
    # out); a production deployment with more traffic should ask for more.
    if holdout_rows < min_holdout:
        log.info(f"not enough holdout rows to gate an adapter ({holdout_rows} < {min_holdout}); nothing trained")
        return {"status": "skipped", "reason": "not enough data", "dataset": card}

    adapter = train_adapter(str(data_dir), str(settings.runs_dir / "adapters"), base, settings.database_url,
                            max_steps=max_steps, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                            lora_dropout=lora_dropout, load_in_4bit=load_in_4bit, torch_compile=torch_compile)
    verdict = gate_adapter(str(data_dir), adapter["adapter_dir"], base, settings.database_url, answer_tolerance)
    log.info(f"adapter {adapter['name']}: offline gate {'PASSED' if verdict['passed'] else 'FAILED'}")
    if not verdict["passed"]:
        return {"status": "rejected", "adapter": adapter, "gate": verdict}

    load_on_candidate_server(candidate_server, adapter["name"], adapter["adapter_dir"])
    experiment_id = start_experiment(settings.database_url, candidate_server, adapter["name"],
                                     adapter["adapter_id"], candidate_share, rollout)
    plan = f"rollout {rollout['steps']}" if rollout else f"{candidate_share:.0%} of users"
    log.info(f"experiment {experiment_id}: candidate {adapter['name']} on {plan}")
    return {"status": "candidate", "experiment_id": experiment_id, "adapter": adapter, "gate": verdict}
