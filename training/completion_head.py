"""On CPU, score only the completion tokens: the LM head projected for the positions the loss sees.

trl's SFTTrainer patches the model with a fused LM head (`trl.trainer.utils.add_fused_lm_head`)
that, without Triton, scores every position, prompt and padding included, through tiled torch
ops. With completion-only loss most positions are prompt (the retrieved passages): this head cut
a SmolLM2-135M step on CPU by more than a quarter (docs/BENCHMARKS.md, "CPU training: the LM head
on the completion positions only"). It returns the same `FusedCausalLMOutput` (loss, per-token
log-probabilities, entropy and top-1 for trl's metrics, zero where the label is -100) from logits
of the completion positions alone, so trl's loss and logging stay as they are. CUDA keeps trl's
head: there its Triton kernel already scores only those positions and never materialises the logits.
Here they are materialised, in fp32: completion tokens x 49,152 x 4 bytes, twice with their gradient
(4 rows of 256 completion tokens: 0.4 GB); a SmolLM2-135M run's peak RSS still fell by 0.37 GB.
"""

from __future__ import annotations

import functools
import types
from typing import Any

_SCALING_FIELDS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                   "logits_scaling")  # fmt: skip
_OUTPUT_FIELDS = {"loss", "log_probs", "entropy", "is_top1", "label_mask"}


def use_completion_head(causal_lm: Any) -> bool:
    """Replace trl's fused LM head on `causal_lm` (the PEFT model's base) with this one; False if not applicable.

    Not applicable, and left as trl made it: a trl without the fused head (`fused_lm_head` calls)
    or with another output type than the one this head fills, or a model whose logits are scaled or
    soft-capped (this head computes plain logits).
    """
    try:
        from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head  # noqa: F401 - the fused path exists
    except ImportError:
        return False
    if not _OUTPUT_FIELDS.issubset(getattr(FusedCausalLMOutput, "__dataclass_fields__", ())):
        return False
    config = causal_lm.config.get_text_config()
    if any(getattr(config, field, None) not in (None, 1.0) for field in _SCALING_FIELDS):
        return False
    trl_forward = causal_lm.forward

    @functools.wraps(trl_forward)
    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head or kwargs.get("output_router_logits"):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        scored = _score(self.get_output_embeddings(), hidden[mask], labels[mask])
        log_probs, entropy, is_top1 = (value.new_zeros(mask.shape).masked_scatter(mask, value) for value in scored)
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denominator, log_probs=log_probs, entropy=entropy,
                                   is_top1=is_top1, label_mask=mask)

    causal_lm.forward = types.MethodType(forward, causal_lm)
    return True


def _score(lm_head: Any, hidden: Any, targets: Any) -> tuple[Any, Any, Any]:
    """Log-probability of each target (with gradient), the entropy and whether the target is the argmax."""
    import torch

    logits = lm_head(hidden).float()
    log_z = logits.logsumexp(-1)
    log_probs = logits.gather(-1, targets[:, None]).squeeze(-1) - log_z
    with torch.no_grad():
        probabilities = (logits - log_z[:, None]).exp()
        entropy = log_z - (probabilities * logits).sum(-1)
        is_top1 = (logits.argmax(-1) == targets).to(log_probs.dtype)
    return log_probs, entropy, is_top1
