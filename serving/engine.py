"""The batching generation engine: the front door that ties the scheduler, the model runner and the
adapter manager together, and the worker thread that drives them.

One worker thread owns the model.  Requests are queued by :mod:`serving.scheduler` (bounded: a full queue
is refused, never grown); between decode steps the worker applies queued adapter loads and unloads
(:mod:`serving.adapters`), admits waiting requests into the running batch and runs one step of
:mod:`serving.runner` (continuous batching, per-row finishing and sampling, mixed adapters).  The layout
follows vLLM's engine: the front end and each part import one way (engine -> adapters -> runner ->
requests / sampling), never back.

``max_batch=1`` switches batching off (one request at a time), for comparison.  ``per_row_lora=True``
runs every forward with adapters loaded per row (peft's ``adapter_names``) instead of
:mod:`serving.lora_routing`'s paths, and ``compile=True`` runs the
base model's decode steps through ``torch.compile``; both for comparison (docs/BENCHMARKS.md, "Single
stream (issue 13)").
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import torch

from serving.adapters import AdapterManager
from serving.errors import EngineError, EngineStopped, GenerationFailed, ModelNotFound, PromptTooLong
from serving.model import LoadedModel
from serving.requests import EngineStats, RequestHandle
from serving.runner import ModelRunner
from serving.sampling import SamplingParams
from serving.scheduler import Scheduler

log = logging.getLogger(__name__)


class Engine:
    """Owns a loaded base model; serves chat completions for it and its LoRA adapters."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch: int = 16,
        max_queue: int = 256,
        default_max_tokens: int = 256,
        per_row_lora: bool = False,
        compile: bool = False,
    ):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.default_max_tokens = default_max_tokens
        self.max_context = loaded.max_context
        self.stats = EngineStats()
        self.created = int(time.time())
        self._cond = threading.Condition()
        self._scheduler = Scheduler(self._cond, self.stats, max_batch=max_batch, max_queue=max_queue)
        self._runner = ModelRunner(loaded, self.stats, per_row_lora=per_row_lora,
                                    compile=compile)
        self._adapters = AdapterManager(self._runner, self._cond, base_name=loaded.name,
                                        is_running=lambda: self.running)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._worker, name="serving-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ requests
    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> RequestHandle:
        """Queue a request (call from the event loop); raises :class:`QueueFull` instead of growing."""
        if not prompt_ids:
            raise EngineError("the prompt is empty", param="messages")
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise PromptTooLong(
                f"The prompt has {len(prompt_ids)} tokens; this model's context is {self.max_context} tokens.",
                param="messages",
            )
        params.max_tokens = max(1, min(params.max_tokens, room))
        handle = RequestHandle(prompt_ids, params, adapter, on_cancel=self._wake)
        with self._cond:
            if self._stopping or not self.running:
                raise EngineStopped("the engine is not running")
            if adapter is not None and not self._adapters.is_routable(adapter):
                raise ModelNotFound(f"The model `{adapter}` does not exist.", param="model")
            self._scheduler.add(handle)
        return handle

    @property
    def active_rows(self) -> int:
        return self._runner.active_rows

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._scheduler)

    # ------------------------------------------------------------------ adapters (see serving.adapters)
    def model_names(self) -> list[str]:
        return self._adapters.model_names()

    def adapters(self) -> dict[str, dict[str, Any]]:
        return self._adapters.adapters()

    def resolve(self, model: str) -> str | None:
        """The adapter for a request's ``model`` (``None`` = base); raises :class:`ModelNotFound`."""
        return self._adapters.resolve(model)

    async def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        await self._adapters.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> None:
        await self._adapters.unload_adapter(name)

    # ------------------------------------------------------------------ worker thread
    def _worker(self) -> None:
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException:  # pragma: no cover - a bug; fail every waiting request loudly
            log.exception("serving engine worker crashed")
            self._fail_all(GenerationFailed("the generation worker crashed"))
            raise

    def _loop(self) -> None:
        runner = self._runner
        while True:
            with self._cond:
                while not (self._stopping or self._adapters.has_ops() or runner.active_rows or len(self._scheduler)):
                    self._cond.wait()
                if self._stopping:
                    break
                ops = self._adapters.take_ops()
            # Adapter changes first, while every request that might use them is still visible
            # (queued or in the batch): an unload waits for those.
            self._adapters.run_ops(ops, in_use=lambda name: runner.uses_adapter(name)
                                   or self._scheduler.waiting_for(name))
            runner.drop_cancelled()
            can_admit = runner.active_rows == 0 or runner.can_join
            admitted = self._scheduler.admit(runner.active_rows) if can_admit else []
            try:
                runner.step(admitted)
            except Exception as exc:  # noqa: BLE001 - answer the requests instead of dying
                log.exception("generation failed")
                error = GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}")
                for handle in runner.take_rows() + admitted:
                    handle.fail(error)
        self._fail_all(EngineStopped("the server is shutting down"))

    def _fail_all(self, error: EngineError) -> None:
        for handle in self._scheduler.drain() + self._runner.take_rows():
            handle.fail(error)
        self._adapters.fail_ops(error)
