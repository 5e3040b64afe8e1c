"""The CUDA batch plan: exact model arithmetic, and batches that always add up to the target."""

import pytest

from training.batching import BatchPlan, ModelShape, plan_batch, plan_step

GIB = 2**30
SMOLLM2_135M = ModelShape(hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, vocab=49152)
SMOLLM2_1_7B = ModelShape(hidden=2048, layers=24, intermediate=8192, heads=32, kv_heads=32, vocab=49152)


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
    # Recomputing keeps every layer's input and one layer's activations; no logits either way (trl's
    # fused LM head keeps two fp32 figures per token).
    one_layer = (kept[False] - 8) // SMOLLM2_135M.layers
    assert kept[True] == SMOLLM2_135M.layers * 576 * 2 + one_layer + 8


def test_lora_dropout_keeps_a_copy_and_a_mask_of_every_adapters_input():
    h, i = 576, 1536
    for checkpointing, layers in ((False, SMOLLM2_135M.layers), (True, 1)):
        with_dropout, without = (
            SMOLLM2_135M.activation_bytes_per_token(dtype_bytes=2, checkpointing=checkpointing, lora_dropout=d)
            for d in (True, False)
        )
        assert with_dropout - without == layers * (6 * h + i) * (2 + 1)


def test_without_dropout_a_1_7b_step_of_32_keeps_its_activations_on_an_h200():
    # Measured on an H200 (docs/BENCHMARKS.md): with dropout the plan recomputed at 32 sequences, and
    # the rate fell from 28.5k tokens/s at 16 to 22k.
    with_dropout = plan_step(139 * GIB, SMOLLM2_1_7B, seq_len=1024, target_batch=32, lora_r=16)
    without = plan_step(139 * GIB, SMOLLM2_1_7B, seq_len=1024, target_batch=32, lora_r=16, lora_dropout=False)
    assert with_dropout == BatchPlan(per_device=32, accumulation=1, checkpointing=True)
    assert without == BatchPlan(per_device=32, accumulation=1, checkpointing=False)


def test_the_plan_errs_high_against_the_h200_measurement():
    # 1.7B, 16 packed sequences, dropout 0.05, activations kept: 56,136 MB peak measured on the H200.
    per_token = SMOLLM2_1_7B.activation_bytes_per_token(dtype_bytes=2, checkpointing=False)
    estimate = SMOLLM2_1_7B.params * 2 + SMOLLM2_1_7B.lora_params(16) * 16 + 16 * 1024 * per_token
    assert 56_136 * 2**20 < estimate < 1.5 * 56_136 * 2**20


# Activations kept: about 1.2 MB a token at 135M, 1.2 GB a row of 1024 tokens.
KEPT_135M = SMOLLM2_135M.activation_bytes_per_token(dtype_bytes=2, checkpointing=False)


def _plan(free_gib: float, target: int = 16, seq_len: int = 1024) -> BatchPlan:
    return plan_batch(
        int(free_gib * GIB),
        params=SMOLLM2_135M.params,
        seq_len=seq_len,
        target_batch=target,
        bytes_per_token=KEPT_135M,
        trainable_params=SMOLLM2_135M.lora_params(16),
        checkpointing=False,
    )


def test_a_large_gpu_takes_the_whole_batch_in_one_pass():
    assert _plan(80) == BatchPlan(per_device=16, accumulation=1, checkpointing=False)


def test_less_memory_means_smaller_passes_that_still_add_up_to_the_target():
    plans = [_plan(gib, target=12) for gib in (80, 8, 4, 2.5, 2)]
    assert all(plan.effective == 12 for plan in plans)
    assert all(12 % plan.per_device == 0 for plan in plans)
    per_device = [plan.per_device for plan in plans]
    assert per_device == sorted(per_device, reverse=True) and per_device[0] == 12 and per_device[-1] < 12


def test_the_plan_fits_and_the_next_larger_divisor_would_not():
    def needed(rows: int) -> int:
        return SMOLLM2_135M.params * 2 + SMOLLM2_135M.lora_params(16) * 16 + rows * 1024 * KEPT_135M

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


def test_activations_are_kept_when_recomputing_would_not_buy_larger_passes():
    # 1.7B, 4 rows of 1024 tokens: ~4 GiB a row kept, ~0.3 GiB recomputed; an H200 holds the step either way.
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
