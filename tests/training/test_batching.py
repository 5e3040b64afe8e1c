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
            SMOLLM2_135M.activation_bytes_per_token(dtype_bytes=2, checkpointing=checkpointing, adapter_dropout=d)
            for d in (True, False)
        )
        assert with_dropout - without == layers * (6 * h + i) * (2 + 1)


def test_without_dropout_a_1_7b_step_of_32_keeps_its_activations_on_an_h200():
    # Measured on an H200 (docs/BENCHMARKS.md): with dropout the plan recomputed at 32 sequences, and
    # the rate fell from 28.5k tokens/s at 16 to 22k.
    with_dropout = plan_step(139 * GIB, SMOLLM2_1_7B, seq_len=1024, target_batch=32, lora_r=16)
    without = plan_step(139 * GIB, SMOLLM2_1_7B, seq_len=1024, target_batch=32, lora_r=16, adapter_dropout=False)
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


def test_the_layer_figures_are_the_documented_ones():
    # Per token and layer: (10h + 4kv + 4i) values in the compute dtype, plus (6h + i) x (dtype + 1)
    # with dropout; the loss keeps 8 bytes. 135M has grouped key and value heads (kv = 192).
    kept = (10 * 576 + 4 * 192 + 4 * 1536) * 2
    assert SMOLLM2_135M.activation_bytes_per_token(dtype_bytes=2, checkpointing=False, adapter_dropout=False) == (
        30 * kept + 8
    )
    assert SMOLLM2_1_7B.activation_bytes_per_token(dtype_bytes=4, checkpointing=False) == (
        24 * ((10 * 2048 + 4 * 2048 + 4 * 8192) * 4 + (6 * 2048 + 8192) * 5) + 8
    )


def test_a_config_without_grouped_heads_or_tied_embeddings_fields():
    from types import SimpleNamespace

    config = SimpleNamespace(hidden_size=64, num_hidden_layers=2, intermediate_size=176, num_attention_heads=8,
                             vocab_size=1000)  # fmt: skip
    shape = ModelShape.from_config(config)
    assert shape.kv_heads == 8 and shape.tied_embeddings is False


@pytest.mark.parametrize("rows", [1, 2, 4, 8])
def test_the_plan_takes_exactly_what_fits(rows):
    # Every term counted once: free memory for `rows` rows and one byte less give `rows` and fewer.
    weights, trainable, workspace, per_token = 1_000_000, 50_000, 300_000, 1_000

    def plan(free: float) -> BatchPlan:
        return plan_batch(int(free), params=weights, seq_len=100, target_batch=8, bytes_per_token=per_token,
                          weight_bytes=0.55, trainable_params=trainable, workspace_bytes=workspace, headroom=0.5,
                          checkpointing=False)  # fmt: skip

    needed = weights * 0.55 + trainable * 16 + workspace + rows * 100 * per_token
    assert plan(needed / 0.5 + 2) == BatchPlan(per_device=rows, accumulation=8 // rows, checkpointing=False)
    if rows == 1:
        with pytest.raises(ValueError, match="one row of 100 tokens"):
            plan(needed / 0.5 - 2)
    else:
        assert plan(needed / 0.5 - 2).per_device == rows // 2
    assert type(plan(needed / 0.5 + 2).accumulation) is int


def test_the_defaults_hold_the_weights_in_bf16_and_nothing_else():
    needed = 1_000_000 * 2 + 4 * 100 * 1_000
    # One byte over: a default that held one byte more would not fit the four rows.
    fits = plan_batch(int(needed / 0.8) + 1, params=1_000_000, seq_len=100, target_batch=4, bytes_per_token=1_000)
    assert fits == BatchPlan(per_device=4, accumulation=1, checkpointing=True)
    short = plan_batch(int(needed / 0.8) - 2, params=1_000_000, seq_len=100, target_batch=4, bytes_per_token=1_000)
    assert short.per_device == 2


def test_the_smallest_plan_and_what_is_refused():
    assert plan_batch(10**9, params=1, seq_len=1, target_batch=1, bytes_per_token=1) == BatchPlan(1, 1)
    for target, seq_len in ((0, 1), (1, 0)):
        with pytest.raises(ValueError, match="^target_batch and seq_len must be at least 1$"):
            plan_batch(10**9, params=1, seq_len=seq_len, target_batch=target, bytes_per_token=1)


def test_a_refusal_says_what_a_row_needs_and_what_is_free():
    with pytest.raises(ValueError) as refused:
        plan_batch(3 * GIB, params=2 * GIB, seq_len=1024, target_batch=4, bytes_per_token=2**20)
    assert str(refused.value) == (
        "one row of 1024 tokens needs about 5.0 GiB with the weights; 3.0 GiB are free (x0.8 headroom): "
        "use a shorter max length, 4-bit weights or a larger GPU"
    )


def test_the_step_plan_counts_the_weights_dtype_the_adapters_and_the_loss_tile():
    from training.batching import _LOSS_TILE_BYTES, _TRAINABLE_BYTES

    per_row = 1024 * SMOLLM2_1_7B.activation_bytes_per_token(dtype_bytes=2, checkpointing=False)
    fixed = SMOLLM2_1_7B.params * 0.55 + SMOLLM2_1_7B.lora_params(16) * _TRAINABLE_BYTES + _LOSS_TILE_BYTES
    free = (fixed + 8 * per_row) / 0.8

    def plan(free_bytes: float) -> BatchPlan:
        return plan_step(int(free_bytes), SMOLLM2_1_7B, seq_len=1024, target_batch=8, lora_r=16, weight_bytes=0.55)

    assert plan(free + 2) == BatchPlan(per_device=8, accumulation=1, checkpointing=False)
    assert plan(free - 2) == BatchPlan(per_device=8, accumulation=1, checkpointing=True)
