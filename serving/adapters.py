"""The LoRA adapter registry: which adapter names are routable, and loading/unloading them with peft.

Adapter names are versions: a name is never accepted twice, even after an unload, so a response that
names an adapter always came from the same weights.  The API side (validate, reserve the name, queue the
op) runs on the event loop; the ops themselves run on the engine's worker thread between steps, so they
never race a forward.  An unload takes the name out of service at once (new requests get 404) and
deletes the weights once no queued or running request uses them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from serving.errors import AdapterExists, BadAdapter, EngineError, EngineStopped, ModelNotFound

if TYPE_CHECKING:
    from serving.engine import RequestHandle, _Batch

# The engine's logger name, so log configuration and filters written for the engine still see these lines.
log = logging.getLogger("serving.engine")

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass
class _AdapterOp:
    kind: str  # "load" | "unload"
    name: str
    path: str | None
    future: Future


class _AdapterRegistry:
    """The adapter half of :class:`serving.engine.Engine` (a mixin: it shares the engine's lock and queues)."""

    # Provided by the engine.
    name: str
    model: Any
    running: bool
    _cond: threading.Condition
    _ops: list[_AdapterOp]
    _pending: deque[RequestHandle]
    _batch: _Batch | None

    def _init_registry(self) -> None:
        self._peft: Any = None  # the PeftModel wrapper once the first adapter is loaded
        self._adapters: dict[str, dict[str, Any]] = {}  # routable adapters: name -> {"path", "created"}
        self._used_names: set[str] = {self.name}  # every adapter name ever loaded or being loaded

    # ------------------------------------------------------------------ registry (any thread)
    def model_names(self) -> list[str]:
        with self._cond:
            return [self.name, *self._adapters]

    def adapters(self) -> dict[str, dict[str, Any]]:
        with self._cond:
            return {k: dict(v) for k, v in self._adapters.items()}

    def resolve(self, model: str) -> str | None:
        """The adapter for a request's ``model`` (``None`` = base); raises :class:`ModelNotFound`."""
        if model == self.name:
            return None
        with self._cond:
            if model in self._adapters:
                return model
        raise ModelNotFound(f"The model `{model}` does not exist.", param="model")

    async def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load a LoRA adapter under ``name`` (a name is never accepted twice)."""
        if not name or not name.strip():
            raise BadAdapter("lora_name must be a non-empty string", param="lora_name")
        p = Path(path).expanduser()
        if not (p / "adapter_config.json").is_file():
            raise BadAdapter(
                f"lora_path {str(path)!r} is not a directory holding an adapter_config.json", param="lora_path"
            )
        if not any((p / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            raise BadAdapter(
                f"lora_path {str(path)!r} holds no adapter weights (adapter_model.safetensors)", param="lora_path"
            )
        with self._cond:
            if name in self._used_names:
                if name == self.name:
                    why = "it is the base model's name"
                elif name in self._adapters:
                    why = "an adapter with that name is loaded"
                else:
                    why = (
                        "it was used before (adapter names are versions and are never reused; "
                        "load it under a new name)"
                    )
                raise AdapterExists(f"The lora adapter '{name}' cannot be loaded: {why}.", param="lora_name")
            self._used_names.add(name)
        try:
            await self._run_op("load", name, str(p.resolve()))
        except Exception:  # not on cancellation: the load then still completes and keeps its name
            with self._cond:
                self._used_names.discard(name)  # never served: the name stays free
            raise

    async def unload_adapter(self, name: str) -> None:
        with self._cond:
            if name not in self._adapters:
                raise ModelNotFound(f"The lora adapter '{name}' cannot be found.", param="lora_name")
            del self._adapters[name]  # out of service now; weights go when no request uses them
        await self._run_op("unload", name, None)

    async def _run_op(self, kind: str, name: str, path: str | None) -> None:
        if not self.running:
            raise EngineStopped("the engine is not running")
        fut: Future = Future()
        with self._cond:
            self._ops.append(_AdapterOp(kind, name, path, fut))
            self._cond.notify_all()
        await asyncio.shield(asyncio.wrap_future(fut))  # a client that goes away does not undo the op

    # ------------------------------------------------------------------ ops (worker thread)
    def _adapter_in_use(self, name: str) -> bool:
        if self._batch and any(r.adapter_key == name for r in self._batch.rows):
            return True
        with self._cond:
            return any(h.adapter == name and not h.cancelled for h in self._pending)

    def _run_ops(self, ops: list[_AdapterOp]) -> None:
        deferred: list[_AdapterOp] = []
        for op in ops:
            try:
                if op.kind == "load":
                    self._do_load(op.name, op.path)
                elif self._adapter_in_use(op.name):
                    deferred.append(op)
                    continue
                else:
                    self._do_unload(op.name)
                op.future.set_result(None)
            except Exception as exc:  # noqa: BLE001
                op.future.set_exception(
                    exc if isinstance(exc, EngineError) else BadAdapter(f"cannot load adapter: {exc}")
                )
        if deferred:
            with self._cond:
                self._ops[:0] = deferred

    def _do_unload(self, name: str) -> None:
        if set(self._peft.peft_config) <= {name}:
            # The last adapter: take the LoRA layers out again (a PeftModel without adapters is not
            # usable) and go back to the plain base model; the next load wraps it afresh.
            self.model = self._peft.unload()
            self._peft = None
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "adapter X was active ...": we pass adapter_names per row
                self._peft.delete_adapter(name)
        log.info("unloaded adapter %s", name)

    def _do_load(self, name: str, path: str) -> None:
        from peft import PeftModel

        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if self._peft is None:
                try:
                    self._peft = PeftModel.from_pretrained(
                        self.model, path, adapter_name=name, is_trainable=False
                    )
                except BaseException:
                    _strip_tuner_layers(self.model)  # a half-done first load must not change the base
                    raise
            else:
                try:
                    self._peft.load_adapter(path, adapter_name=name, is_trainable=False)
                except BaseException:
                    if name in self._peft.peft_config:
                        self._do_unload(name)
                    raise
        self._peft.eval()
        with self._cond:
            self._adapters[name] = {"path": path, "created": int(time.time())}
        log.info("loaded adapter %s from %s in %.2fs", name, path, time.perf_counter() - t0)


def _strip_tuner_layers(model: torch.nn.Module) -> None:
    """Replace any peft tuner layer inside ``model`` by the layer it wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if "peft_config" in model.__dict__:
        del model.peft_config
