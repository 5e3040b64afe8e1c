"""The model runner: the running batch, its forward calls and its KV cache (worker thread only).

* **continuous batching** - admitted requests are prefilled as one left-padded group, then their KV
  caches are left-padded to a common length and concatenated onto the running batch;
* **per-row finishing** - each row stops on its own ``max_tokens``, stop strings or EOS, is answered at
  once and is dropped from the batch (and its KV cache), so short requests never wait for long ones;
* **per-row sampling** - :mod:`serving.sampling`, with each row's own settings and generator;
* **mixed adapters** - once an adapter is loaded, :attr:`peft` wraps the model and base and adapter rows
  share a batch: each LoRA layer adds each adapter's product on that adapter's rows only
  (:mod:`serving.lora_routing`), or, for layers that cannot take that forward, peft's per-row
  ``adapter_names`` (``"__base__"`` for the base model) split the batch. :mod:`serving.adapters` sets
  :attr:`model` and :attr:`peft`; nothing else does.
"""

from __future__ import annotations

from typing import Any

import torch

from serving.lora_routing import LoraRouting
from serving.model import LoadedModel
from serving.requests import Completion, EngineStats, RequestHandle
from serving.sampling import cut_at_stop, new_generator, sample, streamable

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


class _Row:
    """One request inside the running batch."""

    __slots__ = ("handle", "generated", "sent", "next_token", "generator", "adapter_key", "text")

    def __init__(self, handle: RequestHandle, device: torch.device):
        self.handle = handle
        self.generated: list[int] = []
        self.sent = 0  # characters of text already streamed
        self.text = ""
        self.next_token: int | None = None  # sampled but not yet fed to the model
        self.adapter_key = handle.adapter or BASE_ADAPTER
        self.generator = new_generator(handle.params, device)


class _Batch:
    """The running batch: rows, the shared KV cache, the 2-D attention mask and next positions."""

    def __init__(self, rows: list[_Row], cache: Any, mask: torch.Tensor, positions: torch.Tensor):
        self.rows = rows
        self.cache = cache
        self.mask = mask  # [B, L] long, 0 = padding
        self.positions = positions  # [B] position id of the next fed token


class ModelRunner:
    def __init__(self, loaded: LoadedModel, stats: EngineStats, *, per_row_lora: bool = False,
                 compile: bool = False):
        from serving.kv_cache import cache_argument  # imports transformers

        self.model = loaded.model
        self.peft: Any = None  # the PeftModel wrapper once the first adapter is loaded
        self.lora = LoraRouting()
        self.per_row_lora = per_row_lora  # True: every forward with adapters loaded passes adapter_names
        # Decode steps of the base model (no adapter loaded) through torch.compile; dynamic shapes, so the
        # growing KV cache and the changing batch do not recompile. The first decode step compiles, and the first
        # of a single row once more: torch specialises sizes 0 and 1 (TORCH_LOGS=recompiles shows it).
        self._compiled = torch.compile(self.model.forward, dynamic=True) if compile else None
        self._cache_argument = cache_argument(self.model)
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.stats = stats
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids or {0})
        self.can_join = True  # False when the cache type cannot be merged (then batches run to the end)
        self._batch: _Batch | None = None

    @property
    def active_rows(self) -> int:
        batch = self._batch
        return len(batch.rows) if batch is not None else 0

    def uses_adapter(self, name: str) -> bool:
        return self._batch is not None and any(r.adapter_key == name for r in self._batch.rows)

    def step(self, admitted: list[RequestHandle]) -> None:
        """Prefill ``admitted`` into the batch, or else run one decode step of the batch."""
        if admitted:
            self.stats.requests += len(admitted)
            self._prefill(admitted)
        elif self._batch is not None:
            self._decode_step()

    def take_rows(self) -> list[RequestHandle]:
        """Empty the batch and return its requests (to fail them after an error or at shutdown)."""
        rows = self._batch.rows if self._batch else []
        self._batch = None
        return [r.handle for r in rows]

    def drop_cancelled(self) -> None:
        if self._batch is None:
            return
        keep = [i for i, r in enumerate(self._batch.rows) if not r.handle.cancelled]
        if len(keep) != len(self._batch.rows):
            self._select_rows(keep)

    # -- forward calls ------------------------------------------------------------------------
    def _forward(self, input_ids, mask, positions, cache, rows: list[_Row], *, decode: bool):
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_argument: cache},
        )
        self.stats.max_rows = max(self.stats.max_rows, input_ids.shape[0])
        if self.peft is None:
            out = (self._compiled if decode and self._compiled is not None else self.model)(**kwargs)
        elif not self.per_row_lora and self.lora.install(self.peft):
            adapters = [None if r.adapter_key == BASE_ADAPTER else r.adapter_key for r in rows]
            self.stats.masked_forwards += len(set(adapters)) > 1
            with self.lora.rows(adapters):
                out = self.peft(**kwargs)
        else:  # the layers have peft's own forward here: install() gave them none, or was not asked to
            self.stats.per_row_forwards += 1
            out = self.peft(**kwargs, adapter_names=[r.adapter_key for r in rows])
        return out.logits[:, -1, :]

    def _prefill(self, handles: list[RequestHandle]) -> None:
        from transformers import DynamicCache

        from serving.kv_cache import growing_cache

        rows = [_Row(h, self.device) for h in handles]
        width = max(len(h.prompt_ids) for h in handles)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, h in enumerate(handles):
            n = len(h.prompt_ids)
            ids[i, width - n :] = torch.tensor(h.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Inductor cannot compile writes into a buffer longer than its content (dynamic shapes): the compiled
        # decode keeps transformers' own layers, which concatenate.
        cache = (DynamicCache(config=self.model.config) if self._compiled is not None
                 else growing_cache(self.model.config))
        self.stats.prefill_batches += 1
        logits = self._forward(ids, mask, positions, cache, rows, decode=False)
        new = _Batch(rows, cache, mask, mask.sum(-1))
        if _cache_layers(cache) is None:
            self.can_join = False  # e.g. sliding-window layers: run each batch to its end instead
        if self._batch is None:
            self._batch = new
        else:
            self._merge(new)
        self._after_logits(logits, rows, offset=len(self._batch.rows) - len(rows))

    def _decode_step(self) -> None:
        b = self._batch
        assert b is not None
        ids = torch.tensor([[r.next_token] for r in b.rows], dtype=torch.long, device=self.device)
        b.mask = torch.cat([b.mask, torch.ones((len(b.rows), 1), dtype=b.mask.dtype, device=self.device)], dim=1)
        logits = self._forward(ids, b.mask, b.positions.unsqueeze(1), b.cache, b.rows, decode=True)
        b.positions = b.positions + 1
        self.stats.decode_steps += 1
        self._after_logits(logits, b.rows, offset=0)

    # -- tokens -------------------------------------------------------------------------------
    def _after_logits(self, logits: torch.Tensor, rows: list[_Row], offset: int) -> None:
        """Sample one token for each of ``rows`` (batch rows ``offset..``), then finish rows that are done."""
        tokens = sample(logits, [r.handle.params for r in rows], [r.generator for r in rows])
        finished: list[int] = []
        for i, (row, tok) in enumerate(zip(rows, tokens, strict=True)):
            if self._advance(row, tok):
                finished.append(offset + i)
        if finished:
            assert self._batch is not None
            gone = set(finished)
            self._select_rows([i for i in range(len(self._batch.rows)) if i not in gone])

    def _advance(self, row: _Row, tok: int) -> bool:
        """Add ``tok`` to ``row``; stream what is safe to stream; return True when the row is finished."""
        h = row.handle
        params = h.params
        self.stats.generated_tokens += 1
        row.generated.append(tok)
        finish: str | None = None
        if tok in self.eos_ids and not params.ignore_eos:
            finish = "stop"
            text = row.text
        else:
            text = self.tokenizer.decode(row.generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            text, stopped = cut_at_stop(text, params.stop)
            if stopped:
                finish = "stop"
            elif len(row.generated) >= params.max_tokens:
                finish = "length"
        row.text = text
        if h.cancelled:
            return True
        if finish is None:
            safe = streamable(text, params.stop)  # nothing that a stop string could take back
            if safe > row.sent:
                h.emit("delta", text[row.sent : safe])
                row.sent = safe
            row.next_token = tok
            return False
        if len(text) > row.sent:
            h.emit("delta", text[row.sent :])
        h.done = True
        self.stats.completed += 1
        h.emit("done", Completion(text=text, finish_reason=finish, prompt_tokens=len(h.prompt_ids),
                                  completion_tokens=len(row.generated)))
        return True

    # -- KV cache bookkeeping -------------------------------------------------------------------
    def _select_rows(self, keep: list[int]) -> None:
        b = self._batch
        assert b is not None
        if not keep:
            self._batch = None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        b.cache.batch_select_indices(idx)
        b.mask = b.mask[idx]
        b.positions = b.positions[idx]
        b.rows = [b.rows[i] for i in keep]
        # Drop leading columns that are padding for every remaining row.
        layers = _cache_layers(b.cache)
        if layers is None:
            return
        live = b.mask.any(dim=0).nonzero()
        first = int(live[0].item()) if len(live) else 0
        if first > 0:
            b.mask = b.mask[:, first:]
            for layer in layers:
                if layer.is_initialized and layer.keys is not None and layer.keys.numel():
                    layer.keys = layer.keys[:, :, first:, :]
                    layer.values = layer.values[:, :, first:, :]

    def _merge(self, new: _Batch) -> None:
        """Append ``new``'s rows to the running batch, left-padding the shorter KV cache."""
        b = self._batch
        assert b is not None
        old_layers, new_layers = _cache_layers(b.cache), _cache_layers(new.cache)
        if old_layers is None or new_layers is None:  # pragma: no cover - other model families
            raise RuntimeError("cannot merge this model's KV cache")
        width = max(b.mask.shape[1], new.mask.shape[1])
        pad_old, pad_new = width - b.mask.shape[1], width - new.mask.shape[1]
        for lo, ln in zip(old_layers, new_layers, strict=True):
            if not (lo.is_initialized and ln.is_initialized):
                raise RuntimeError("uninitialised cache layer")
            lo.keys = torch.cat([_left_pad(lo.keys, pad_old, 2), _left_pad(ln.keys, pad_new, 2)], dim=0)
            lo.values = torch.cat([_left_pad(lo.values, pad_old, 2), _left_pad(ln.values, pad_new, 2)], dim=0)
        b.mask = torch.cat([_left_pad(b.mask, pad_old, 1), _left_pad(new.mask, pad_new, 1)], dim=0)
        b.positions = torch.cat([b.positions, new.positions])
        b.rows = b.rows + new.rows


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos: set[int] = set()
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (generation_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, (list, tuple)):
            eos.update(int(v) for v in value)
    return eos


def _cache_layers(cache) -> list | None:
    """The cache's layers if every one is a plain growing layer we can pad/trim, else None."""
    from transformers.cache_utils import DynamicLayer

    from serving.kv_cache import SlackLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) not in (DynamicLayer, SlackLayer) for layer in layers):
        return None
    return layers


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)
