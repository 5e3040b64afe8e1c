"""serving.kv_cache: the same keys and values as transformers' concatenating layer, without a copy per step."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers.cache_utils import DynamicLayer  # noqa: E402

from serving.kv_cache import MIN_SLACK, SlackLayer, cache_argument, growing_cache  # noqa: E402


def _states(batch: int, positions: int, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 2, positions, 8, generator=generator) for _ in range(2))


def _assert_same(layer: SlackLayer, reference: DynamicLayer) -> None:
    assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
    assert layer.get_seq_length() == reference.get_seq_length()


def test_appends_match_concatenation_and_grow_the_buffer_only_when_it_is_full():
    layer, reference = SlackLayer(), DynamicLayer()
    buffers = []
    for step in range(MIN_SLACK + 10):
        keys, values = _states(3, 5 if step == 0 else 1, seed=step)  # a prefill of 5, then decode steps
        got, want = layer.update(keys, values), reference.update(keys, values)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        _assert_same(layer, reference)
        pointers = (layer._keys_buffer.data_ptr(), layer._values_buffer.data_ptr())
        if not buffers or pointers != buffers[-1]:
            buffers.append(pointers)
    # 5 + MIN_SLACK + 9 positions: the prefill's buffers (room for MIN_SLACK more) and one larger pair
    assert len(buffers) == 2
    assert layer._keys_buffer.shape[-2] > layer.get_seq_length()


def test_assigned_tensors_become_the_content_and_appends_continue_after_them():
    layer, reference = SlackLayer(), DynamicLayer()
    for step in range(4):
        states = _states(4, 3 if step == 0 else 1, seed=10 + step)
        layer.update(*states)
        reference.update(*states)
    rows = torch.tensor([0, 2, 3])
    layer.batch_select_indices(rows)  # as the runner drops finished rows
    reference.batch_select_indices(rows)
    _assert_same(layer, reference)
    for target in (layer, reference):  # as the runner trims leading padding
        target.keys, target.values = target.keys[:, :, 2:], target.values[:, :, 2:]
    _assert_same(layer, reference)
    for step in range(3):
        states = _states(3, 1, seed=20 + step)
        layer.update(*states)
        reference.update(*states)
        _assert_same(layer, reference)
    layer.reset()
    assert layer.keys is None and layer.get_seq_length() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_padded_batch_decodes_to_the_same_logits_with_either_cache(dtype):
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(dtype).eval()
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :5] = 0  # left padding, as the runner builds its batches
    runs = []
    for cache in (DynamicCache(config=config), growing_cache(config)):
        step_mask, positions, feed, logits = mask, (mask.cumsum(-1) - 1).clamp(min=0), ids, []
        with torch.inference_mode():
            for _ in range(12):
                out = model(input_ids=feed, attention_mask=step_mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{cache_argument(model): cache}).logits[:, -1]
                logits.append(out)
                feed = out.argmax(-1, keepdim=True)
                positions = positions[:, -1:] + 1
                step_mask = torch.cat([step_mask, torch.ones_like(feed)], dim=1)
        runs.append(torch.stack(logits))
    assert all(type(layer) is SlackLayer for layer in cache.layers)
    assert torch.equal(runs[0], runs[1])


def test_the_cache_argument_is_the_one_the_model_takes():
    from transformers import LlamaForCausalLM

    name = cache_argument(LlamaForCausalLM)
    assert name in ("cache", "past_key_values")
    assert name in __import__("inspect").signature(LlamaForCausalLM.forward).parameters


def test_a_forward_without_a_cache_parameter_gets_past_key_values():
    class Older:  # transformers before 5.2x: the cache goes in as past_key_values
        def forward(self, input_ids, past_key_values=None, use_cache=None): ...

    assert cache_argument(Older()) == "past_key_values"


def test_sliding_window_layers_are_left_as_transformers_made_them():
    from transformers import Qwen2Config

    config = Qwen2Config(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                         use_sliding_window=True)  # fmt: skip
    assert [type(layer).__name__ for layer in growing_cache(config).layers] == ["DynamicSlidingWindowLayer",
                                                                                 "SlackLayer"]  # fmt: skip
