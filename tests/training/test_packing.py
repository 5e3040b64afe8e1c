"""Packed (padding-free) batches train on the same loss as padded ones, through trl with SDPA and
through the varlen kernel's path (training.varlen, with CPU stand-ins for its CUDA kernel).

CUDA training packs rows with SDPA when no FlashAttention varlen kernel is available (training.train
`_packing_attention`). That is right only because transformers builds a block-diagonal mask from
the position ids when there is no attention mask and no cache, and trl's SFTTrainer turns the
cache off in its loss; the varlen path needs trl's collator to pass the rows' boundaries to every
attention call. A transformers or trl upgrade that changes any of this fails here, on CPU.
"""

import pytest

from tests.training.conftest import varlen_reference, varlen_reference_gqa
from training.train import MAX_LENGTH, _packing_attention

ROWS = [
    ("How do I sort a list?", "Call sorted() on it, or list.sort() to sort in place."),
    ("What does zip do?", "It pairs items of several iterables."),
    ("How do I read a file line by line in Python without loading all of it?", "Iterate over the open file."),
]


def _trainer(model_dir, out_dir, *, packing: bool, attention: str = "sdpa"):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in ROWS
        ]
    )
    config = SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=len(ROWS),  # every row in one batch: the same tokens both ways
        max_length=MAX_LENGTH,
        completion_only_loss=True,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,  # trl's default is on; recomputing changes nothing compared here
        report_to="none",
        **({"packing": True, "packing_strategy": "bfd", "padding_free": True} if packing else {}),
    )
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation=attention, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)


def _loss(trainer, drop: str | None = None) -> float:
    import torch

    batch = next(iter(trainer.get_train_dataloader()))
    if drop:
        batch.pop(drop)
    trainer.model.eval()  # no dropout; the cache is trl's business, as in training
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


@pytest.mark.slow
def test_packed_rows_give_the_padded_loss_with_sdpa(tiny_model_dir, tmp_path):
    padded = _trainer(tiny_model_dir, tmp_path / "padded", packing=False)
    packed = _trainer(tiny_model_dir, tmp_path / "packed", packing=True)
    packed_batch = next(iter(packed.get_train_dataloader()))
    assert packed_batch["input_ids"].shape[0] == 1 and "attention_mask" not in packed_batch  # one flat sequence
    assert "attention_mask" in next(iter(padded.get_train_dataloader()))

    # Measured: 1e-6 apart (float32 summation order), and 1e-3 when rows attend to each other (a
    # random model barely looks at its context, hence the small gap): the bounds sit between the two.
    padded_loss = _loss(padded)
    assert _loss(packed) == pytest.approx(padded_loss, abs=1e-5)
    # Without the position ids the rows attend to each other: a different loss, so the check can fail.
    assert abs(_loss(packed, drop="position_ids") - padded_loss) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [varlen_reference, varlen_reference_gqa], ids=["torch-2.11", "torch-2.13"])
def test_packed_rows_give_the_padded_loss_through_the_varlen_kernel(tiny_model_dir, tmp_path, monkeypatch, kernel):
    import functools

    from training import varlen

    calls = []

    @functools.wraps(kernel)  # its signature too: whether it takes enable_gqa decides how heads are grouped
    def counted(*args, **kwargs):
        calls.append((args[0].shape, kwargs["scale"]))
        return kernel(*args, **kwargs)

    # The CUDA kernel cannot run here: a reference with its signature and layout stands in for it.
    monkeypatch.setattr(varlen, "_kernel", lambda: counted)
    padded = _trainer(tiny_model_dir, tmp_path / "padded", packing=False)
    packed = _trainer(tiny_model_dir, tmp_path / "packed", packing=True, attention=varlen.register())
    assert _loss(packed) == pytest.approx(_loss(padded), abs=1e-5)
    tokens = next(iter(packed.get_train_dataloader()))["input_ids"].shape[1]
    # Every layer, [tokens, query heads, head dim] (tiny: 4 heads of 16, 2 kv heads), the model's scale.
    assert calls == [((tokens, 4, 16), 16**-0.5)] * 2

    calls.clear()  # padded batches (the holdout loss) carry no row boundaries: SDPA with its mask
    _loss(_trainer(tiny_model_dir, tmp_path / "padded-varlen", packing=False, attention=varlen.NAME))
    assert calls == []

    # Packed rows without their boundaries would attend to each other under SDPA without a mask.
    with pytest.raises(ValueError, match="without their boundaries"):
        _loss(packed, drop="cu_seq_lens_q")


def test_a_packed_forward_through_the_varlen_kernel_builds_no_mask(tiny_model_dir):
    import torch
    from transformers import AutoConfig
    from transformers.masking_utils import create_causal_mask

    from training import varlen

    config = AutoConfig.from_pretrained(str(tiny_model_dir))
    embeds = torch.zeros(1, 7, config.hidden_size)
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1]])  # three rows in one flattened sequence

    def mask(attention: str, attention_mask=None, position_ids=packed):
        config._attn_implementation = attention
        return create_causal_mask(config, embeds, attention_mask, cache=None, position_ids=position_ids)

    assert mask(varlen.register()) is None  # the kernel takes the rows' boundaries instead
    assert mask("sdpa").shape == (1, 1, 7, 7)  # what SDPA needs, and what varlen skips building
    # Padding is SDPA's business on the fallback path: its mask, unchanged.
    padding = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    assert torch.equal(mask(varlen.NAME, padding, None), mask("sdpa", padding, None))


def test_packing_is_the_cuda_default_and_asked_for_on_cpu(monkeypatch):
    import transformers.utils

    from training import varlen

    assert _packing_attention(on_cuda=False, packing=None) is None  # the CPU path pads, as it always did
    assert _packing_attention(on_cuda=False, packing=True) == "sdpa"
    assert _packing_attention(on_cuda=True, packing=False) is None
    assert _packing_attention(on_cuda=True, packing=None, attention="sdpa") == "sdpa"
    assert _packing_attention(on_cuda=True, packing=False, attention="sdpa") is None
    monkeypatch.setattr(transformers.utils, "is_flash_attn_3_available", lambda: False)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    monkeypatch.setattr(varlen, "available", lambda: False)
    assert _packing_attention(on_cuda=True, packing=None) == "sdpa"
    monkeypatch.setattr(varlen, "available", lambda: True)
    assert _packing_attention(on_cuda=True, packing=None) == varlen.NAME
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert _packing_attention(on_cuda=True, packing=None) == "flash_attention_2"
    monkeypatch.setattr(transformers.utils, "is_flash_attn_3_available", lambda: True)
    assert _packing_attention(on_cuda=True, packing=None) == "flash_attention_3"
    # Named, the varlen kernel is registered with transformers on the way (a model loaded with an unknown
    # attn_implementation is refused).
    registered = []
    monkeypatch.setattr(varlen, "register", lambda: registered.append(varlen.NAME) or varlen.NAME)
    assert _packing_attention(on_cuda=True, packing=None, attention=varlen.NAME) == varlen.NAME
    assert _packing_attention(on_cuda=False, packing=True, attention="eager") == "eager"
    assert registered == [varlen.NAME]


@pytest.mark.parametrize(("flags", "packing"), [([], None), (["--packing"], True), (["--no-packing"], False)])
def test_abloop_train_packing_flag(flags, packing):
    from abloop.cli import build_parser

    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", *flags])
    assert args.packing is packing and args.batch_size == 4
    assert not args.compile
    tuned = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--batch-size", "16", "--compile"])
    assert tuned.batch_size == 16 and tuned.compile


def test_the_cuda_plan_caps_sdpa_passes_and_keeps_activations_on_a_large_gpu(monkeypatch, tiny_model_dir):
    import torch

    from training.batching import BatchPlan
    from training.train import SDPA_PACKED_ROWS, _cuda_step_plan

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *args: (139 * 2**30, 141 * 2**30))  # an idle H200
    sdpa = _cuda_step_plan(tiny_model_dir, batch_size=16, lora_r=16, load_in_4bit=False, attention="sdpa")
    assert sdpa == BatchPlan(per_device=SDPA_PACKED_ROWS, accumulation=16 // SDPA_PACKED_ROWS, checkpointing=False)
    flash = _cuda_step_plan(tiny_model_dir, batch_size=16, lora_r=16, load_in_4bit=False, attention="flash_attention_2")
    assert flash == BatchPlan(per_device=16, accumulation=1, checkpointing=False)


def test_the_cuda_plan_is_asked_with_the_free_memory_the_shape_and_the_options(monkeypatch, tiny_model_dir, caplog):
    import torch
    from transformers import AutoConfig

    import training.train as train
    from training.batching import BatchPlan, ModelShape

    asked = []

    def plan_step(free_bytes, shape, **options):
        asked.append({"free_bytes": free_bytes, "shape": shape, **options})
        return BatchPlan(per_device=3, accumulation=5, checkpointing=len(asked) == 1)

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *args: (12 * 2**30, 80 * 2**30))
    monkeypatch.setattr(train, "plan_step", plan_step)
    with caplog.at_level("INFO", logger="training.train"):
        plans = [
            train._cuda_step_plan(tiny_model_dir, batch_size=15, lora_r=8, load_in_4bit=True, attention="sdpa"),
            train._cuda_step_plan(tiny_model_dir, batch_size=6, lora_r=32, load_in_4bit=False, attention=None,
                                  adapter_dropout=False),  # fmt: skip
        ]
    assert plans == [BatchPlan(3, 5, True), BatchPlan(3, 5, False)]
    shape = ModelShape.from_config(AutoConfig.from_pretrained(str(tiny_model_dir)))
    both = {"free_bytes": 12 * 2**30, "shape": shape, "seq_len": train.MAX_LENGTH}
    assert asked == [
        {**both, "target_batch": 15, "lora_r": 8, "adapter_dropout": True, "weight_bytes": 0.55,
         "max_per_device": train.SDPA_PACKED_ROWS},
        {**both, "target_batch": 6, "lora_r": 32, "adapter_dropout": False, "weight_bytes": 2.0,
         "max_per_device": None},
    ]  # fmt: skip
    assert [r.getMessage() for r in caplog.records] == [
        "CUDA batch: 3 rows per pass x 5 accumulation, activations recomputed (12.0 GiB free)",
        "CUDA batch: 3 rows per pass x 5 accumulation, activations kept (12.0 GiB free)",
    ]


def test_the_varlen_kernel_is_offered_only_on_a_gpu_that_runs_it(monkeypatch):
    import torch

    from training import varlen

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not varlen.available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (7, 5))  # Turing: no FlashAttention-2
    assert not varlen.available()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (8, 0))  # A100: the first that runs it
    assert varlen.available()  # this torch ships the kernel (2.9 and newer)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    assert varlen.available()
    monkeypatch.setattr(varlen, "_kernel", lambda: None)
    assert not varlen.available()


def test_a_cached_forward_through_the_varlen_kernel_attends_as_sdpa_does(tiny_model_dir):
    # Generation and chunked prefill carry no row boundaries: the second chunk must still see SDPA's
    # mask (its queries sit after the cached keys), not the maskless path of a fresh forward.
    import torch
    from transformers import AutoModelForCausalLM

    from serving.kv_cache import cache_argument
    from training import varlen

    tokens = torch.arange(3, 10).unsqueeze(0)

    def chunked_logits(attention: str):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation=attention)
        with torch.no_grad():
            first = model(input_ids=tokens[:, :4], use_cache=True)
            return model(input_ids=tokens[:, 4:], **{cache_argument(model): first.past_key_values}).logits

    assert torch.allclose(chunked_logits(varlen.register()), chunked_logits("sdpa"), atol=1e-6)
