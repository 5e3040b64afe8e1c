"""How many rows a CUDA training step holds at once, and how many micro-batches make one step.

A pure estimate (no torch): the frozen weights, the LoRA weights with their gradients and AdamW
moments, and the activations one row of `seq_len` tokens keeps alive until the backward pass must
fit in a share of the free memory; the largest per-device batch that fits and divides the target
effective batch wins, and gradient accumulation makes up the rest, so the effective batch is
exactly the target on any GPU. The activation figure follows a decoder layer of the Llama family
(RMSNorm, grouped-query attention through a fused kernel that keeps no seq x seq matrix, SwiGLU
MLP, LoRA on every projection); the loss goes through trl's fused LM head, which projects onto the
vocabulary in tiles and keeps no logits (a fixed tile, counted once). It is meant to err high
(measured on an H200 at 1.7B, docs/BENCHMARKS.md "GPU training"), and `headroom` keeps a margin for
the allocator and kernels' workspaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# fp32 LoRA weight + its gradient + AdamW's two moments.
_TRAINABLE_BYTES = 16
# trl's fused LM head (trl.kernels.chunked_logprob): a [4,096 tokens x 32,768 vocabulary entries]
# bf16 tile in the forward and another in the backward, whatever the batch; per token it keeps two
# fp32 figures (the log-sum-exp and the entropy).
_LOSS_TILE_BYTES = 2 * 4096 * 32768 * 2
_LOSS_BYTES_PER_TOKEN = 8


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-architecture decoder that memory depends on."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = True

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers `LlamaConfig` (or any config with the same field names)."""
        return cls(
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            intermediate=config.intermediate_size,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            vocab=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def params(self) -> int:
        """Parameters of the model (tied embeddings counted once), exact for LlamaForCausalLM."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        attention = h * h * 2 + h * kv * 2  # q and o; k and v
        per_layer = attention + 3 * h * i + 2 * h  # gate, up, down; two RMSNorm weights
        embeddings = self.vocab * h * (1 if self.tied_embeddings else 2)
        return embeddings + self.layers * per_layer + h  # + the final norm

    def lora_params(self, r: int) -> int:
        """LoRA parameters of rank `r` on q, k, v, o, gate, up and down (r x (in + out) each)."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
        return self.layers * per_layer

    def activation_bytes_per_token(self, *, dtype_bytes: int, checkpointing: bool, adapter_dropout: bool = True) -> int:
        """Bytes the backward pass needs per trained token (the layers, and the loss's own figures)."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        # Saved per layer: norm inputs and outputs, q/k/v before and after RoPE, the attention output
        # (4h + 2h + 4kv + h + 2h + ...) and the MLP's gate, up, activation and product (4i).
        layer = (10 * h + 4 * kv + 4 * i) * dtype_bytes
        if adapter_dropout:
            # Each adapter's dropped-out copy of its input (q, k, v, o, gate, up: 6h; down: i) and its
            # mask (a byte per value). Without dropout the adapter's input is the projection's own, kept
            # once (training.train leaves it to autocast instead of copying it to fp32 and back).
            layer += (6 * h + i) * (dtype_bytes + 1)
        # With checkpointing only each layer's input stays; one layer is recomputed at a time.
        layers = self.layers * h * dtype_bytes + layer if checkpointing else self.layers * layer
        return layers + _LOSS_BYTES_PER_TOKEN


@dataclass(frozen=True)
class BatchPlan:
    per_device: int  # rows in one forward/backward pass
    accumulation: int  # passes per optimizer step
    checkpointing: bool = True  # activations recomputed in the backward pass instead of kept

    @property
    def effective(self) -> int:
        return self.per_device * self.accumulation


def plan_batch(
    free_bytes: int,
    *,
    params: int,
    seq_len: int,
    target_batch: int,
    bytes_per_token: int,
    weight_bytes: float = 2.0,
    trainable_params: int = 0,
    workspace_bytes: int = 0,
    headroom: float = 0.8,
    max_per_device: int | None = None,
    checkpointing: bool = True,
) -> BatchPlan:
    """The per-device batch and gradient accumulation that give `target_batch` rows per step.

    `free_bytes` is the device memory free before the model is loaded; `params` are stored at
    `weight_bytes` each (2 for bf16, about 0.55 for 4-bit NF4 with its scales); rows are at most
    `seq_len` tokens and cost `bytes_per_token` each (`ModelShape.activation_bytes_per_token`, with
    the same `checkpointing`, which the plan records); `workspace_bytes` are held once whatever the
    batch (the loss's tile); no pass holds more than `max_per_device` rows. Raises ValueError when
    not even one row fits.
    """
    if target_batch < 1 or seq_len < 1:
        raise ValueError("target_batch and seq_len must be at least 1")
    fixed = params * weight_bytes + trainable_params * _TRAINABLE_BYTES + workspace_bytes
    per_row = seq_len * bytes_per_token
    budget = free_bytes * headroom - fixed
    fits = int(budget // per_row) if budget > 0 else 0
    if fits < 1:
        raise ValueError(
            f"one row of {seq_len} tokens needs about {(fixed + per_row) / 2**30:.1f} GiB with the weights; "
            f"{free_bytes / 2**30:.1f} GiB are free (x{headroom} headroom): use a shorter max length, "
            "4-bit weights or a larger GPU"
        )
    largest = min(fits, target_batch, max_per_device or target_batch)
    per_device = max(d for d in range(1, largest + 1) if target_batch % d == 0)
    return BatchPlan(per_device=per_device, accumulation=target_batch // per_device, checkpointing=checkpointing)


def plan_step(
    free_bytes: int,
    shape: ModelShape,
    *,
    seq_len: int,
    target_batch: int,
    lora_r: int,
    adapter_dropout: bool = True,
    weight_bytes: float = 2.0,
    max_per_device: int | None = None,
) -> BatchPlan:
    """The CUDA plan for a LoRA step: the batch split, and whether to recompute activations.

    Recomputing (activation checkpointing) runs every layer's forward twice, a third more work for
    LoRA (2N recomputed on top of 4N per token), and is worth it only where it buys larger passes:
    the plan keeps activations whenever that fits as many rows per pass as recomputing would.
    """

    def plan(checkpointing: bool) -> BatchPlan:
        return plan_batch(
            free_bytes,
            params=shape.params,
            seq_len=seq_len,
            target_batch=target_batch,
            bytes_per_token=shape.activation_bytes_per_token(
                dtype_bytes=2, checkpointing=checkpointing, adapter_dropout=adapter_dropout
            ),
            weight_bytes=weight_bytes,
            trainable_params=shape.lora_params(lora_r),
            workspace_bytes=_LOSS_TILE_BYTES,
            max_per_device=max_per_device,
            checkpointing=checkpointing,
        )

    recomputing = plan(True)  # raises when not even one row fits
    try:
        keeping = plan(False)
    except ValueError:
        return recomputing
    return keeping if keeping.per_device >= recomputing.per_device else recomputing
