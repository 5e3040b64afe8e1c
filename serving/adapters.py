"""The LoRA adapter manager: which adapter names are routable, and loading/unloading them with peft.

Adapter names are versions: a name is never accepted twice, even after an unload, so a response that
names an adapter always came from the same weights.  The API side (validate, reserve the name, queue the
op) runs on the event loop; the ops themselves run on the engine's worker thread between steps, so they
never race a forward.  An unload takes the name out of service at once (new requests get 404) and
deletes the weights once no queued or running request uses them.  The manager swaps the runner's
``model`` / ``peft`` (after putting peft back in its plain state); the runner never calls back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from serving.errors import AdapterExists, BadAdapter, EngineError, EngineStopped, ModelNotFound
from serving.runner import BASE_ADAPTER, ModelRunner
from serving.schemas import ADAPTER_NAME_CHARS, ADAPTER_NAME_MAX_LENGTH

# The engine's logger name, so log configuration and filters written for the engine still see these lines.
log = logging.getLogger("serving.engine")

_ADAPTER_NAME = re.compile(f"[{ADAPTER_NAME_CHARS}]+")


@dataclass
class _AdapterOp:
    kind: str  # "load" | "unload"
    name: str
    path: str | None
    future: Future


class AdapterManager:
    def __init__(self, runner: ModelRunner, cond: threading.Condition, *, base_name: str,
                 is_running: Callable[[], bool]):
        self.name = base_name
        self._runner = runner
        self._cond = cond  # the engine's: ops are queued under it and the worker waits on it
        self._is_running = is_running
        self._ops: list[_AdapterOp] = []
        self._adapters: dict[str, dict[str, Any]] = {}  # routable adapters: name -> {"path", "created"}
        self._used_names: set[str] = {base_name}  # every adapter name ever loaded or being loaded

    def is_routable(self, name: str) -> bool:
        """Whether requests may use ``name`` now; the caller holds the condition."""
        return name in self._adapters

    def has_ops(self) -> bool:
        return bool(self._ops)

    def take_ops(self) -> list[_AdapterOp]:
        """The queued loads and unloads; the caller holds the condition."""
        ops, self._ops = self._ops, []
        return ops

    def fail_ops(self, error: EngineError) -> None:
        with self._cond:
            ops = self.take_ops()
        for op in ops:
            if not op.future.done():
                op.future.set_exception(error)

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
        _check_name(name)
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
        if not self._is_running():
            raise EngineStopped("the engine is not running")
        fut: Future = Future()
        with self._cond:
            self._ops.append(_AdapterOp(kind, name, path, fut))
            self._cond.notify_all()
        await asyncio.shield(asyncio.wrap_future(fut))  # a client that goes away does not undo the op

    # ------------------------------------------------------------------ ops (worker thread)
    def run_ops(self, ops: list[_AdapterOp], in_use: Callable[[str], bool]) -> None:
        """Apply ``ops``; an unload of an adapter that ``in_use`` says a request still needs waits."""
        if ops:
            self._runner.lora.reset()  # peft loads and unloads adapters in its plain state
        deferred: list[_AdapterOp] = []
        for op in ops:
            try:
                if op.kind == "load":
                    self._do_load(op.name, op.path)
                elif in_use(op.name):
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
        runner = self._runner
        if set(runner.peft.peft_config) <= {name}:
            # The last adapter: take the LoRA layers out again (a PeftModel without adapters is not
            # usable) and go back to the plain base model; the next load wraps it afresh.
            runner.model = runner.peft.unload()
            runner.peft = None
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "adapter X was active ...": we pass adapter_names per row
                runner.peft.delete_adapter(name)
        log.info("unloaded adapter %s", name)

    def _do_load(self, name: str, path: str) -> None:
        from peft import PeftModel

        runner = self._runner
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if runner.peft is None:
                try:
                    runner.peft = PeftModel.from_pretrained(runner.model, path, adapter_name=name, is_trainable=False)
                except BaseException:
                    _strip_tuner_layers(runner.model)  # a half-done first load must not change the base
                    raise
            else:
                active = runner.peft.active_adapter
                try:
                    runner.peft.load_adapter(path, adapter_name=name, is_trainable=False)
                except BaseException:
                    self._undo_load(name, active)
                    raise
        runner.peft.eval()
        with self._cond:
            self._adapters[name] = {"path": path, "created": int(time.time())}
        log.info("loaded adapter %s from %s in %.2fs", name, path, time.perf_counter() - t0)

    def _undo_load(self, name: str, active: str) -> None:
        """Take every trace of a failed load of ``name`` out of peft and make ``active`` the active adapter.

        peft can fail half way through adding an adapter (torch refuses a bad key only when a layer registers
        it) and leave the name in layers' per-adapter dicts (``r``, ``lora_alpha``) though not in its config;
        a later unload of the active adapter then made that ghost active, and every forward failed on it.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        peft = self._runner.peft
        if name in peft.peft_config:
            self._do_unload(name)
        for module in peft.modules():
            if isinstance(module, BaseTunerLayer):
                module.delete_adapter(name)  # a no-op where the name is absent
        if peft.active_adapter != active:
            peft.set_adapter(active)


def _check_name(name: str) -> None:
    """Refuse, as a 400 naming lora_name, an adapter name that peft cannot hold or that means something else."""
    if len(name) > ADAPTER_NAME_MAX_LENGTH:
        raise BadAdapter(f"lora_name is {len(name)} characters long; at most {ADAPTER_NAME_MAX_LENGTH} are allowed",
                         param="lora_name")
    if not _ADAPTER_NAME.fullmatch(name):
        raise BadAdapter(f"lora_name {name!r} may hold only letters, digits, '_' and '-' (peft refuses '.' in an "
                         "adapter name)", param="lora_name")
    # peft's name for "no adapter" in a mixed batch, and the names of torch's module and parameter dicts'
    # own attributes ("training", "forward", "keys", ...), which they refuse as keys.
    if name == BASE_ADAPTER or hasattr(torch.nn.ModuleDict(), name) or hasattr(torch.nn.ParameterDict(), name):
        raise BadAdapter(f"lora_name {name!r} is reserved; choose another name", param="lora_name")


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
