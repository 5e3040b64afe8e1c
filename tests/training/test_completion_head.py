"""The CPU completion head (training.completion_head) gives trl's loss, gradients and metrics from fewer positions."""

import pytest

from training.completion_head import use_completion_head
from training.train import LORA_TARGETS, MAX_LENGTH

ROWS = [
    ("How do I sort a list of tuples by their second item in Python?", "sorted(items, key=lambda t: t[1])."),
    ("What does zip do?", "It pairs the items of several iterables, stopping at the shortest."),
    ("How do I read a file line by line without loading all of it?", "Iterate over the open file object."),
]


def _trainer(model_dir, out_dir):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(0)
    dataset = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in ROWS
        ]
    )
    config = SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=len(ROWS),
        max_length=MAX_LENGTH,
        completion_only_loss=True,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,  # trl's default is on; recomputing changes nothing compared here
        report_to="none",
    )
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    # B is zero at initialisation, which would leave A without gradient: give the adapters weights.
    for name, parameter in trainer.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return trainer


def _step(trainer, batch):
    """Loss, the adapters' gradients and trl's two metrics for one batch."""
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {key: trainer._metrics["train"][key][-1] for key in ("entropy", "mean_token_accuracy")}
    return float(loss.detach()), grads, metrics


@pytest.mark.slow
def test_the_completion_head_gives_trls_loss_gradients_and_metrics(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"]
    assert 0 < int((labels[:, 1:] != -100).sum()) < labels[:, 1:].numel() / 2  # mostly prompt and padding
    trainer.model.train()
    trl_loss, trl_grads, trl_metrics = _step(trainer, batch)

    causal_lm = trainer.model.get_base_model()
    seen = []
    causal_lm.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    assert use_completion_head(causal_lm)
    loss, grads, metrics = _step(trainer, batch)

    assert seen == [int((labels[:, 1:] != -100).sum())]  # the head saw the completion positions only
    assert loss == pytest.approx(trl_loss, abs=1e-6)
    assert grads.keys() == trl_grads.keys() and len(grads) == 2 * 7 * 2  # A and B, 7 targets, 2 layers
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert grad.allclose(trl_grads[name], rtol=1e-4, atol=1e-7), name
    assert metrics == pytest.approx(trl_metrics, rel=1e-5)


@pytest.mark.slow
def test_generation_and_plain_forwards_are_untouched(tiny_model_dir, tmp_path):
    import torch

    trainer = _trainer(tiny_model_dir, tmp_path)
    causal_lm = trainer.model.get_base_model()
    input_ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = causal_lm(input_ids=input_ids).logits
    assert use_completion_head(causal_lm)
    assert torch.equal(causal_lm(input_ids=input_ids).logits, before)


def test_scaled_or_capped_logits_stay_with_trl(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.config.final_logit_softcapping = 30.0  # this head computes plain logits
    forward = model.forward
    assert not use_completion_head(model)
    assert model.forward == forward


def test_scores_are_log_probabilities_entropy_and_top1():
    import torch

    from training.completion_head import _score

    head = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))  # logits = hidden
    hidden = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 0.0]])
    targets = torch.tensor([0, 1, 0])
    log_probs, entropy, is_top1 = _score(head, hidden, targets)
    expected = torch.distributions.Categorical(logits=hidden)
    assert torch.allclose(log_probs, expected.log_prob(targets))
    assert torch.allclose(entropy, expected.entropy())
    assert is_top1.tolist() == [1.0, 0.0, 1.0]  # a tie goes to the first maximum, as argmax (and trl) break it


def test_a_trl_with_another_output_type_keeps_its_own_head(tiny_model_dir, monkeypatch):
    from dataclasses import dataclass

    import trl.trainer.utils
    from transformers import AutoModelForCausalLM

    @dataclass
    class Renamed:  # a future trl whose output names its fields otherwise
        loss: object = None
        token_log_probs: object = None

    monkeypatch.setattr(trl.trainer.utils, "FusedCausalLMOutput", Renamed)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    forward = model.forward
    assert not use_completion_head(model)
    assert model.forward == forward
