"""The CUDA batch plan: exact model arithmetic, and batches that always add up to the target."""

import pytest

from training.batching import BatchPlan, ModelShape, plan_batch, plan_step

GIB = 2**30
SMOLLM2_135M = ModelShape(hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, vocab=49152)


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )


def test_params_match_a_real_llama():
    from transformers import LlamaForCausalLM

    config = _tiny_config()
    model = LlamaForCausalLM(config)
    assert ModelShape.from_config(config).params == sum(p.numel() for p in model.parameters())
    # The count the checkpoint of SmolLM2-135M-Instruct holds (docs/BENCHMARKS.md).
    assert SMOLLM2_135M.params == 134_515_008


def test_lora_params_match_peft_on_the_training_targets():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from training.train import LORA_TARGETS

    config = _tiny_config()
    model = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(r=4, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ModelShape.from_config(config).lora_params(4) == trainable


def test_checkpointing_keeps_less_per_token():
    kept = {c: SMOLLM2_135M.activation_bytes_per_token(dtype_bytes=2, checkpointing=c) for c in (True, False)}
    assert kept[True] < kept[False]
    # The loss over 49,152 logits is a floor that checkpointing cannot remove.
    assert kept[True] > 49152 * 12


def _plan(free_gib: float, target: int = 16, seq_len: int = 1024) -> BatchPlan:
    return plan_batch(
        int(free_gib * GIB),
        params=SMOLLM2_135M.params,
        seq_len=seq_len,
        target_batch=target,
        bytes_per_token=SMOLLM2_135M.activation_bytes_per_token(dtype_bytes=2, checkpointing=True),
        trainable_params=SMOLLM2_135M.lora_params(16),
    )


def test_a_large_gpu_takes_the_whole_batch_in_one_pass():
    assert _plan(80) == BatchPlan(per_device=16, accumulation=1)


def test_less_memory_means_smaller_passes_that_still_add_up_to_the_target():
    plans = [_plan(gib, target=12) for gib in (80, 8, 4, 2, 1.5)]
    assert all(plan.effective == 12 for plan in plans)
    assert all(12 % plan.per_device == 0 for plan in plans)
    per_device = [plan.per_device for plan in plans]
    assert per_device == sorted(per_device, reverse=True) and per_device[0] == 12 and per_device[-1] < 12


def test_the_plan_fits_and_the_next_larger_divisor_would_not():
    per_token = SMOLLM2_135M.activation_bytes_per_token(dtype_bytes=2, checkpointing=True)

    def needed(rows: int) -> int:
        return SMOLLM2_135M.params * 2 + SMOLLM2_135M.lora_params(16) * 16 + rows * 1024 * per_token

    plan = _plan(3)
    assert needed(plan.per_device) <= 0.8 * 3 * GIB
    larger = [d for d in (1, 2, 4, 8, 16) if d > plan.per_device]
    assert larger and needed(larger[0]) > 0.8 * 3 * GIB


def test_longer_rows_never_get_a_larger_batch():
    assert _plan(8, seq_len=4096).per_device < _plan(8, seq_len=1024).per_device


def test_when_not_one_row_fits_it_says_so():
    with pytest.raises(ValueError, match="one row of 1024 tokens"):
        _plan(0.3)
    with pytest.raises(ValueError):
        _plan(80, target=0)


SMOLLM2_1_7B = ModelShape(hidden=2048, layers=24, intermediate=8192, heads=32, kv_heads=32, vocab=49152)


def test_activations_are_kept_when_recomputing_would_not_buy_larger_passes():
    # 1.7B, 4 rows of 1024 tokens: ~5 GiB a row kept, ~1 GiB recomputed; an H200 holds the step either way.
    plan = plan_step(139 * GIB, SMOLLM2_1_7B, seq_len=1024, target_batch=4, lora_r=16)
    assert plan == BatchPlan(per_device=4, accumulation=1, checkpointing=False)


def test_activations_are_recomputed_when_that_buys_larger_passes():
    plan = plan_step(24 * GIB, SMOLLM2_1_7B, seq_len=1024, target_batch=8, lora_r=16)
    kept = plan_batch(
        24 * GIB,
        params=SMOLLM2_1_7B.params,
        seq_len=1024,
        target_batch=8,
        bytes_per_token=SMOLLM2_1_7B.activation_bytes_per_token(dtype_bytes=2, checkpointing=False),
        trainable_params=SMOLLM2_1_7B.lora_params(16),
    )
    assert plan.checkpointing and plan.per_device > kept.per_device and plan.effective == 8


def test_a_gpu_too_small_for_one_row_kept_still_trains_by_recomputing():
    per_row_kept = 1024 * SMOLLM2_1_7B.activation_bytes_per_token(dtype_bytes=2, checkpointing=False)
    free = int((SMOLLM2_1_7B.params * 2 + per_row_kept / 2) / 0.8)  # the weights and half a kept row
    plan = plan_step(free, SMOLLM2_1_7B, seq_len=1024, target_batch=4, lora_r=16)
    assert plan.checkpointing and plan.per_device >= 1 and plan.effective == 4


def test_passes_are_capped_and_still_add_up():
    plan = plan_step(139 * GIB, SMOLLM2_1_7B, seq_len=1024, target_batch=12, lora_r=16, max_per_device=4)
    assert plan == BatchPlan(per_device=4, accumulation=3, checkpointing=False)
