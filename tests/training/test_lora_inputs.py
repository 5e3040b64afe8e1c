"""Under autocast the adapters' inputs are left to autocast (training.train, CUDA): the same
gradients with fewer full-size casts, two per LoRA projection in the forward and two in the backward
(bench/lora_ops.py counts them at the SmolLM2 sizes). Run here under CPU bf16 autocast, which casts
as CUDA's does; without dropout, which on CPU rounds its 1/(1-p) scale to bf16 on a bf16 input
(CUDA's fused dropout scales in fp32), one reason the CPU path keeps peft's casts."""

from bench.lora_ops import casts, operator_count
from training.train import LORA_TARGETS, adapter_inputs_left_to_autocast


def _pass(model_dir, *, left_to_autocast: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    # Random A and B (not peft's zero B): the adapters shape the loss and every gradient.
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      init_lora_weights=False)  # fmt: skip
    model = get_peft_model(base, lora)
    model.train()
    ids = torch.arange(5, 45).unsqueeze(0)
    with adapter_inputs_left_to_autocast(model, mixed_precision=left_to_autocast):
        with operator_count() as forward, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        with operator_count() as backward:
            loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in grads.values())  # the adapters stay fp32 either way
    return loss, grads, (casts(forward.ops), casts(backward.ops)), model.config.num_hidden_layers


def test_the_same_gradients_with_fewer_casts(tiny_model_dir):
    import torch

    loss, grads, cast, layers = _pass(tiny_model_dir, left_to_autocast=False)
    loss_left, grads_left, cast_left, _ = _pass(tiny_model_dir, left_to_autocast=True)
    assert torch.equal(loss, loss_left)
    assert grads.keys() == grads_left.keys() and all(torch.equal(grads[n], grads_left[n]) for n in grads)
    # Per projection: peft's cast up and autocast's cast back down, and both casts' gradients, except
    # in the first layer's q, k and v, whose input (the frozen embeddings, normed) needs no gradient.
    projections = len(LORA_TARGETS) * layers
    assert (cast[0] - cast_left[0], cast[1] - cast_left[1]) == (2 * projections, 2 * projections - 2 * 3)

