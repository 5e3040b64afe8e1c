"""`abloop demo`: the whole loop once, on one machine, on the embedded defaults.

ingest -> serve both arms -> SIMULATED users through the proxy (warm-up, with feedback) -> `retrain`
(dataset -> LoRA -> offline gate -> adapter hot-loaded) -> a progressive rollout driven by the
`evaluate_arms` flow -> the verdict, acted on by the same code an operator's deployment runs (the
rollout rolls back by itself; a promote verdict awaits approval, which the demo gives with the `promote`
flow once each arm has enough users) -> traffic served by the winner -> an HTML report.

Every user is simulated (`sim-` ids, session "simulated", feedback comments say so) and judges
only the text of the answer it got (abloop.users.HouseStyleRule); nothing looks at the arm. All
state lives in `.abloop-demo/`: the store, the index, adapters, Prefect's home and the logs.
Library output goes to `.abloop-demo/logs/`; the terminal shows one line per stage.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

WORK = Path(".abloop-demo")


def _port(variable: str, default: int) -> int:
    return int(os.environ.get(variable, default))


@dataclass(frozen=True)
class DemoConfig:
    """Sizes chosen so the loop closes in about ten minutes on two CPU cores."""

    warmup_users: int = 100
    rollout_steps: tuple[float, ...] = (0.2, 0.5)
    users_per_step: int = 160  # the rollout's minimum users per step: about 110 candidate users by the end
    # The demo approves a promote verdict as an operator would, once each arm has this many users; with
    # the rollout promoting by itself the candidate's count at the end was left to chance (91 to 121).
    approve_min_users: int = 100
    batch_users: int = 80  # users between two evaluations ("hourly" in production)
    max_batches: int = 8
    after_users: int = 20
    max_steps: int = 24  # LoRA steps on CPU
    min_examples: int = 20  # training rows below which retrain skips
    learning_rate: float = 1e-3
    answer_tolerance: float = 0.0  # the offline gate's (flows.retrain)
    concurrency: int = 16
    max_tokens: int = 48
    top_k: int = 1  # one passage: short prompts, fast CPU steps
    score_sample: int = 30
    model: str = "default"  # or an HF directory (tests use a tiny random model)
    seed: int = 0
    corpus: str = "pydoc"  # or a directory of text files (the tests use a few pydoc topics)
    work: Path = WORK
    model_port: int = field(default_factory=lambda: _port("ABLOOP_DEMO_MODEL_PORT", 8001))
    proxy_port: int = field(default_factory=lambda: _port("ABLOOP_DEMO_PROXY_PORT", 8000))

    @property
    def log_path(self) -> Path:
        """Where library output goes while the demo runs (the terminal shows the stages)."""
        return self.work / "logs" / "demo.log"


def demo_env(config: DemoConfig) -> dict[str, str]:
    """Settings for every process of the demo: all state under `config.work`, the demo's decision policy."""
    work = config.work.resolve()
    return {
        "DATABASE_URL": f"sqlite:///{work / 'abloop.db'}",
        "INDEX_DIR": str(work / "index"),
        "RUNS_DIR": str(work / "runs"),
        "SPOOL_DIR": str(work / "spool"),
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_LOGGING_LEVEL": "INFO",
        # Prefect's temporary server shares two busy cores with the model server and the trainer.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "EXPERIMENT_REFRESH_S": "1",
        "LLM_TIMEOUT_S": "600",  # a CPU model serving 16 requests at once is slow, not down
        # A demo-sized policy: a minimum sample of 15 users per arm and an always-valid interval
        # tuned for hundreds of users, not the 100 per arm / 5,000 of production defaults.
        "EXPERIMENT_MIN_USERS_PER_ARM": "15",
        "EXPERIMENT_MIN_SIGNALS_PER_ARM": "10",
        "EXPERIMENT_MIN_RESPONDERS_PER_ARM": "10",
        "EXPERIMENT_SEQUENTIAL_TUNING": "400",
        "ANSWER_SCORE_SAMPLE": str(config.score_sample),
        "LLM_MAX_TOKENS": str(config.max_tokens),
        "TQDM_DISABLE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONWARNINGS": "ignore",
    }


def _cli() -> list[str]:
    return [sys.executable, "-m", "abloop.cli"]


@contextmanager
def _background(name: str, args: list[str], env: dict[str, str], ready_url: str, log_dir: Path) -> Iterator[None]:
    with open(log_dir / f"{name}.log", "ab") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(process, ready_url, log_dir / f"{name}.log")
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
            raise RuntimeError(f"{log_path.stem} exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{log_path.stem} not ready after {timeout_s:.0f}s; see {log_path}")


def _fresh_store(config: DemoConfig) -> None:
    """Each run starts from an empty store and spool (the index and the model cache are kept)."""
    for name in ("abloop.db", "abloop.db-wal", "abloop.db-shm"):
        (config.work / name).unlink(missing_ok=True)
    shutil.rmtree(config.work / "spool", ignore_errors=True)
    config.log_path.parent.mkdir(parents=True, exist_ok=True)


def run_demo(config: DemoConfig | None = None) -> dict[str, Any]:
    """Run the loop; returns the summary the terminal shows last."""
    from abloop.console import DemoConsole

    config = config or DemoConfig()
    config.work.mkdir(parents=True, exist_ok=True)
    _fresh_store(config)
    os.environ.update(demo_env(config))
    with _prefect_settings_from_env(), DemoConsole(config.log_path) as console:
        return _Loop(config, console).run()


def _prefect_settings_from_env():
    """Prefect reads its settings once, at import; a caller that imported it before `run_demo` set the
    demo's environment (the tests do) would otherwise keep its own home and the 20 s server start-up limit."""
    import prefect.context
    from prefect.settings import Settings as PrefectSettings

    current = prefect.context.get_settings_context()
    return prefect.context.SettingsContext(profile=current.profile, settings=PrefectSettings())


class _Loop:
    """The stages in order; each is a method so the flow of the demo reads top to bottom in `run`."""

    def __init__(self, config: DemoConfig, console) -> None:
        from abloop.users import HouseStyleRule, make_users, queries

        self.config = config
        self.console = console
        # Corrections are what teaches the trainer the house style; keen correctors keep the warm-up short.
        self.rule = HouseStyleRule(correction_rate=0.8)
        self.queries = queries(200, seed=config.seed)
        self.users = make_users(config.warmup_users + config.max_batches * config.batch_users + config.after_users,
                                seed=config.seed)
        self.next_user = 0
        self.acted: str | None = None  # what became of the experiment, and who acted
        self.admin_token = secrets.token_urlsafe(16)
        self.model_base = f"http://127.0.0.1:{config.model_port}/v1"
        self.proxy_url = f"http://127.0.0.1:{config.proxy_port}"

    def run(self) -> dict[str, Any]:
        from store.config import Settings

        settings = Settings()
        self.console.note(f"simulated users' rule: {self.rule.describe()}")
        self.index(settings)
        # The model server does the heavy work while users search (training runs only between those stages),
        # so it gets every core; the proxy's single embedding thread is enough (bench/proxy_overhead.py).
        env = dict(os.environ)
        logs = self.config.log_path.parent
        ports = (self.config.model_port, self.config.proxy_port)
        serve = [*_cli(), "serve-model", "--model", self.config.model, "--port", str(ports[0])]
        with self.console.stage("serve", f"model server :{ports[0]} and proxy :{ports[1]}") as stage, \
                _background("model-server", serve, env, f"http://127.0.0.1:{ports[0]}/healthz", logs):
            model = httpx.get(f"{self.model_base}/models", timeout=30).json()["data"][0]["id"]
            proxy_env = env | {"LLM_API_BASE": self.model_base, "LLM_MODEL": model, "ADMIN_TOKEN": self.admin_token,
                               "OMP_NUM_THREADS": "1"}
            # One worker: the model server needs the other core more than the proxy does.
            with _background("proxy", [*_cli(), "proxy", "--port", str(ports[1]), "--workers", "1"], proxy_env,
                             f"{self.proxy_url}/readyz", logs):
                stage.done(f"{model} serves control; no candidate yet")
                warmup = self.simulate("warm-up", self.config.warmup_users)
                outcome = self.retrain()
                if outcome["status"] != "candidate":
                    return self.console.summary(self._summary(outcome, None, warmup))
                final = self.rollout(outcome)
                after = self.simulate("after", self.config.after_users)
                report = self.report(final)
        summary = self._summary(outcome, final, warmup, after, report)
        return self.console.summary(summary)

    def index(self, settings) -> None:
        from flows.ingest import ingest
        from retrieval.index import IndexStore

        what = "Python's documentation topics" if self.config.corpus == "pydoc" else self.config.corpus
        with self.console.stage("index", f"{what} (`ingest` flow)") as stage:
            current = IndexStore(settings.index_dir).current_version()
            if current is None:
                built = ingest(corpus=self.config.corpus)
                stage.done(f"index {built['index_version']}: {built['chunks']} chunks")
            else:
                stage.done(f"reusing index {current}")

    def simulate(self, name: str, n: int) -> dict[str, Any]:
        from abloop.users import run_simulation

        users = self.users[self.next_user:self.next_user + n]
        self.next_user += n
        with self.console.stage(name, f"{n} SIMULATED users search through the proxy and give feedback") as stage:
            report = run_simulation(self.proxy_url, users, queries=self.queries, rule=self.rule,
                                    concurrency=self.config.concurrency, seed=self.config.seed + self.next_user,
                                    top_k=self.config.top_k, on_result=lambda _r: stage.advance())
            stage.done(_describe_simulation(report))
        return report.to_dict()

    def retrain(self) -> dict[str, Any]:
        from flows.retrain import retrain

        plan = {"steps": list(self.config.rollout_steps), "min_users_per_step": self.config.users_per_step,
                "min_hours_per_step": 0, "auto_promote": False}
        with self.console.stage("retrain", f"dataset -> LoRA ({self.config.max_steps} steps, CPU) -> offline gate "
                                           "-> adapter hot-loaded -> rollout") as stage:
            outcome = retrain(candidate_server=self.model_base, days=1, max_steps=self.config.max_steps,
                              learning_rate=self.config.learning_rate, min_examples=self.config.min_examples,
                              answer_tolerance=self.config.answer_tolerance, base=self.config.model, rollout=plan)
            if outcome["status"] == "candidate":
                holdout = outcome["gate"]["holdout"]
                stage.done(f"{outcome['adapter']['name']}: holdout loss {holdout['loss_base']:.3f} -> "
                           f"{holdout['loss_adapter']:.3f}, gate passed; rollout {_steps(self.config.rollout_steps)}")
            else:
                stage.fail(f"no candidate: {outcome['status']} ({outcome.get('reason') or outcome.get('gate')})")
        return outcome

    def rollout(self, outcome: dict[str, Any]) -> dict[str, Any]:
        from flows.evaluate_arms import evaluate_arms

        time.sleep(2)  # the proxy picks up the new experiment within EXPERIMENT_REFRESH_S
        analysis: dict[str, Any] = {}
        with self.console.stage("rollout", f"{_steps(self.config.rollout_steps)}, evaluated by the `evaluate_arms` "
                                           f"flow every {self.config.batch_users} users; a promote verdict "
                                           f"approved at {self.config.approve_min_users} users per arm") as stage:
            for batch in range(self.config.max_batches):
                self.simulate(f"rollout batch {batch + 1}", self.config.batch_users)
                time.sleep(0.5)  # the proxy's writer flushes every few milliseconds
                analysis = evaluate_arms(experiment_id=outcome["experiment_id"])
                did = analysis["decision"].get("rollout", {}).get("did", "-")
                stage.update(f"batch {batch + 1}: {analysis['decision']['action']}, rollout {did} "
                             f"(share {analysis['candidate_share']:.0%})")
                self.console.note(f"evaluate_arms after batch {batch + 1}: {analysis['decision']['action']} - "
                                  f"{analysis['decision']['reason']} [rollout: {did}]")
                if did == "awaiting_approval":
                    did = self.approve(analysis)
                if did == "rolled_back":
                    self.acted = f"rolled back by the rollout: {analysis['decision']['reason']}"
                if did in ("promoted", "rolled_back"):
                    time.sleep(2)  # replicas refresh the experiment
                    stage.done(f"{did} after {batch + 1} evaluations")
                    break
            else:
                stage.done(f"no verdict after {self.config.max_batches} evaluations: "
                           f"{analysis['decision']['action']}")
        return analysis

    def approve(self, analysis: dict[str, Any]) -> str:
        """Stand in for the operator of a plan without auto-promotion: approve once each arm is large enough."""
        from flows.promote import promote

        users = {arm: analysis["arms"][arm]["users"] for arm in ("control", "candidate")}
        if not _ready_to_approve(users, self.config.approve_min_users):
            self.console.note(f"promote verdict awaits approval; the demo approves at {self.config.approve_min_users} "
                              f"users per arm (control {users['control']}, candidate {users['candidate']})")
            return "awaiting_approval"
        reason = (f"approved by the demo, standing in for an operator: promote verdict with {users['control']} "
                  f"control and {users['candidate']} candidate users")
        promote(experiment_id=analysis["experiment_id"], reason=reason)
        self.console.note(f"`promote` flow: {reason}")
        self.acted = f"promoted by the `promote` flow, {reason}"
        return "promoted"

    def report(self, analysis: dict[str, Any]) -> Path:
        from experiment.decision import Policy
        from experiment.report import write_report
        from store.config import Settings
        from store.db import Database

        with self.console.stage("report", "self-contained HTML report") as stage:
            settings = Settings()
            path = write_report(Database(settings.database_url), analysis.get("experiment_id"), Path("reports"),
                                Policy.from_settings(settings))
            stage.done(str(path))
        return path

    def _summary(self, outcome, final, warmup, after=None, report=None) -> dict[str, Any]:
        gate = (outcome.get("gate") or {}).get("holdout", {})
        summary: dict[str, Any] = {
            "simulated": "every user and every piece of feedback in this run was simulated (sim- users)",
            "holdout_loss": {"base": gate.get("loss_base"), "adapter": gate.get("loss_adapter")},
            "adapter": (outcome.get("adapter") or {}).get("name"),
            "warmup": warmup,
            "retrain": outcome["status"],
        }
        if final:
            primary = final.get("primary") or {}
            summary |= {
                "experiment_id": final["experiment_id"],
                "verdict": final["decision"],
                "primary_metric": final["primary_metric"],
                "arms": {arm: {"users": final["arms"][arm]["users"],
                               "value": (primary.get("arms") or {}).get(arm, {}).get("value"),
                               "ci": (primary.get("arms") or {}).get(arm, {}).get("ci")}
                         for arm in ("control", "candidate")},
                "difference": {"value": primary.get("difference"), "ci": primary.get("ci")},
            }
        if self.acted:
            summary["acted"] = self.acted
        if after:
            summary["after"] = after
        if report:
            summary["report"] = str(report)
        return summary


def _ready_to_approve(users: dict[str, int], min_users: int) -> bool:
    """The demo's approval rule: every arm has at least `min_users` users in the experiment."""
    return min(users.values()) >= min_users


def _steps(steps: tuple[float, ...]) -> str:
    return " -> ".join(f"{s:.0%}" for s in steps)


def _describe_simulation(report) -> str:
    """One line: who served, how many answers were in house style, and how users reacted, per arm."""
    parts = []
    for arm in ("control", "candidate"):
        if report.arms.get(arm):
            rate = report.thumbs_up_rate(arm)
            parts.append(f"{arm} {report.arms[arm]} ({report.house_style.get(arm, 0)} house style, thumbs-up "
                         f"{'-' if rate is None else f'{rate:.0%}'})")
    models = ", ".join(f"{model} {n}" for model, n in sorted(report.models.items()))
    errors = f", {report.errors} errors" if report.errors else ""
    return f"{'; '.join(parts)}; served by {models}{errors}"
