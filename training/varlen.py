"""Packed rows attended through PyTorch's own FlashAttention varlen kernel (CUDA, no flash-attn package).

trl's padding-free collator flattens a packed micro-batch into one sequence and passes the rows'
boundaries with it (`cu_seq_lens_q/k`, `max_length_q/k`). The flash-attn package's kernels take
them directly. Without that package, SDPA attends across the whole flattened micro-batch under a
block-diagonal mask: its work grows with the square of the micro-batch's tokens, most of it on
masked-out blocks, and the masked path cannot use SDPA's flash kernel. PyTorch (2.9 and newer)
ships FlashAttention's varlen kernel as `torch.nn.attention.varlen.varlen_attn`; this module
registers it with transformers as the attention implementation `NAME`.

A call that carries no boundaries (the holdout loss's padded batches, generation) goes to SDPA with
SDPA's own mask, so only packed training changes kernel. A packed forward builds no mask at all:
the kernel takes the rows' boundaries instead, and SDPA's block-diagonal mask for a micro-batch of
T tokens is a T x T tensor (268 MB at 16 packed rows of 1,024 tokens) that nothing would read.
Causal attention over whole rows only: no sliding window (the Llama family has none).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

NAME = "abloop_varlen"
_MIN_CAPABILITY = (8, 0)  # FlashAttention-2: Ampere and newer


def available() -> bool:
    """Whether this process can train packed rows through the varlen kernel (a CUDA GPU it supports)."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < _MIN_CAPABILITY:
        return False
    return _kernel() is not None


def register() -> str:
    """Make `NAME` a transformers attention implementation (idempotent); returns `NAME`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, functools.partial(_mask, sdpa_mask))
    return NAME


def _mask(sdpa_mask: Any, **kwargs: Any) -> Any:
    """No mask for a forward over unpadded sequences with nothing cached; SDPA's mask otherwise.

    Such a forward is either plain causal (SDPA's `is_causal` needs no mask) or packed, which is
    where the mask would be a T x T block diagonal; the kernel attends by the rows' boundaries
    instead, and `attention_forward` refuses packed rows that come without them.
    """
    # Queries and keys of the same length: no cached keys before the queries (a cache's second chunk
    # and a static cache's prefill both have more keys than queries).
    if kwargs.get("attention_mask") is None and kwargs["q_length"] == kwargs["kv_length"]:
        return None
    return sdpa_mask(**kwargs)


def attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention-function contract: [batch, heads, tokens, dim] in, [batch, tokens, heads, dim] out."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if attention_mask is None and query.shape[2] > 1 and _packed(kwargs.get("position_ids")):
            # `_mask` built no block-diagonal mask: SDPA would let the rows attend to each other.
            raise ValueError(
                f"packed rows reached the {NAME} attention without their boundaries (cu_seq_lens_q/k, "
                "max_length_q/k, as trl's padding-free collator passes them)"
            )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if dropout:
        raise ValueError("the varlen kernel has no attention dropout; train with attention_dropout=0")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # One flattened sequence: [1, heads, tokens, dim] -> [tokens, heads, dim], the kernel's layout.
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    kernel = _kernel()
    options: dict[str, Any] = {"scale": scaling, "window_size": (-1, 0) if causal else (-1, -1)}
    if k.shape[1] != q.shape[1]:
        if _takes_enable_gqa(kernel):
            options["enable_gqa"] = True
        else:  # torch 2.9-2.12: every query head needs its own key and value head
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = kernel(q, k, v, cu_q, cu_k, int(kwargs["max_length_q"]), int(kwargs["max_length_k"]), **options)
    return out.unsqueeze(0), None


def _packed(position_ids: Any) -> bool:
    """Whether position ids restart inside a row: several sequences packed into one.

    The rule of transformers' `masking_utils.find_packed_sequence_indices`, which decides when SDPA
    gets the block-diagonal mask; not that function itself, which answers "packed" for every call
    while it is traced (torch.compile), and would refuse every maskless call of a compiled model.
    """
    if position_ids is None:
        return False
    return bool((position_ids[..., 1:] - position_ids[..., :-1] != 1).any())


def _kernel() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch older than 2.9
        return None
    return varlen_attn


@functools.cache
def _takes_enable_gqa(kernel: Any) -> bool:
    # Once per kernel, not per layer and step: the training step is bound by the host already.
    return "enable_gqa" in inspect.signature(kernel).parameters
