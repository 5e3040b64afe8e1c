"""training.varlen's attention function, called as transformers calls it, on a CPU stand-in for the
CUDA kernel (tests/training/conftest.py) that checks the arguments the kernel needs."""

import functools
import types

import pytest

from tests.training.conftest import varlen_reference_gqa
from training import varlen

HEADS, DIM, SCALE = 4, 8, 0.3
ROWS = (3, 2, 4)  # tokens of the three packed rows


def _qkv(kv_heads: int, batch: int = 1, tokens: int = sum(ROWS)):
    import torch

    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, heads, tokens, DIM, generator=generator) for heads in (HEADS, kv_heads, kv_heads))


def _module(kv_heads: int, is_causal: bool = True):
    return types.SimpleNamespace(is_causal=is_causal, num_key_value_groups=HEADS // kv_heads)


def _boundaries() -> dict:
    import torch

    starts = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in ROWS]).unsqueeze(0)
    return {"cu_seq_lens_q": starts, "cu_seq_lens_k": starts, "max_length_q": 4, "max_length_k": 4,
            "position_ids": positions}  # fmt: skip


def _row_by_row(query, key, value, causal: bool):
    """The expected output, [1, tokens, heads, dim]: each row attends only to itself."""
    import torch

    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    rows, start = [], 0
    for n in ROWS:
        part = slice(start, start + n)
        attended = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, part], key[:, :, part], value[:, :, part], is_causal=causal, scale=SCALE
        )
        rows.append(attended.transpose(1, 2))
        start += n
    return torch.cat(rows, dim=1)


@pytest.fixture
def kernel_calls(monkeypatch) -> list:
    calls = []

    @functools.wraps(varlen_reference_gqa)  # torch 2.13's signature: enable_gqa
    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return varlen_reference_gqa(*args, **kwargs)

    monkeypatch.setattr(varlen, "_kernel", lambda: recorded)
    return calls


@pytest.mark.parametrize(("kv_heads", "options"), [(2, {"enable_gqa": True}), (HEADS, {})], ids=["gqa", "mha"])
def test_packed_rows_attend_only_within_their_row(kernel_calls, kv_heads, options):
    import torch

    query, key, value = _qkv(kv_heads)
    out, weights = varlen.attention_forward(_module(kv_heads), query, key, value, None, scaling=SCALE, **_boundaries())
    assert out.shape == (1, sum(ROWS), HEADS, DIM) and weights is None  # transformers' contract
    assert torch.allclose(out, _row_by_row(query, key, value, causal=True), atol=1e-6)
    assert kernel_calls == [{"scale": SCALE, "window_size": (-1, 0), **options}]  # grouped heads only when they are


@pytest.mark.parametrize("where", ["module", "call"])
def test_bidirectional_attention_has_no_window(kernel_calls, where):
    import torch

    query, key, value = _qkv(2)
    module = _module(2, is_causal=where != "module")
    is_causal = {"is_causal": False} if where == "call" else {}
    out, _ = varlen.attention_forward(module, query, key, value, None, scaling=SCALE, **is_causal, **_boundaries())
    assert torch.allclose(out, _row_by_row(query, key, value, causal=False), atol=1e-6)
    assert kernel_calls[0]["window_size"] == (-1, -1)


def test_the_kernel_has_no_attention_dropout(kernel_calls):
    with pytest.raises(ValueError, match="no attention dropout; train with attention_dropout=0"):
        varlen.attention_forward(_module(2), *_qkv(2), None, dropout=0.1, scaling=SCALE, **_boundaries())


def test_calls_without_one_flattened_sequence_go_to_sdpa_as_they_are(kernel_calls):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key, value = _qkv(2, batch=2, tokens=5)
    padding = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    padding[1, :, :, 3:] = False  # the second row is 3 tokens long
    for boundaries in ({}, {"cu_seq_lens_q": torch.tensor([0, 5]), "cu_seq_lens_k": torch.tensor([0, 5])}):
        out, _ = varlen.attention_forward(_module(2), query, key, value, padding, scaling=SCALE, **boundaries)
        expected, _ = sdpa_attention_forward(_module(2), query, key, value, padding, scaling=SCALE)
        assert torch.equal(out, expected)
    assert kernel_calls == []  # two rows in the batch: not the flattened sequence the kernel takes


def test_packed_rows_without_their_boundaries_are_refused():
    import torch

    query, key, value = _qkv(2, tokens=2)
    with pytest.raises(ValueError, match=r"without their boundaries \(cu_seq_lens_q/k, max_length_q/k"):
        varlen.attention_forward(_module(2), query, key, value, None, position_ids=torch.tensor([[0, 0]]))
    # One sequence, or none said, or one token (decoding): SDPA's causal attention is right.
    varlen.attention_forward(_module(2), query, key, value, None, position_ids=torch.tensor([[0, 1]]))
    varlen.attention_forward(_module(2), query, key, value, None)
    decoding = [t[:, :, :1] for t in (query, key, value)]
    varlen.attention_forward(_module(2), *decoding, None, position_ids=torch.tensor([[7]]))


def test_register_makes_the_name_known_to_transformers(monkeypatch):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for interface in (AttentionInterface, AttentionMaskInterface):
        monkeypatch.delitem(interface._global_mapping, varlen.NAME, raising=False)
    assert varlen.register() == varlen.NAME
    assert AttentionInterface._global_mapping[varlen.NAME] is varlen.attention_forward
    assert AttentionMaskInterface._global_mapping[varlen.NAME].func is varlen._mask


def test_a_module_that_does_not_say_is_causal(kernel_calls):
    query, key, value = _qkv(2)
    module = types.SimpleNamespace(num_key_value_groups=2)  # transformers' default then: causal
    varlen.attention_forward(module, query, key, value, None, scaling=SCALE, **_boundaries())
    assert kernel_calls[0]["window_size"] == (-1, 0)


def test_the_sdpa_fallback_gets_the_calls_own_options():
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key, value = _qkv(2, tokens=5)
    options = {"scaling": SCALE, "is_causal": False, "dropout": 0.5}
    torch.manual_seed(3)
    out, _ = varlen.attention_forward(_module(2), query, key, value, None, **options)
    torch.manual_seed(3)
    expected, _ = sdpa_attention_forward(_module(2), query, key, value, None, **options)
    assert torch.equal(out, expected)
    torch.manual_seed(3)  # the check can fail: causal and without dropout, another output
    assert not torch.equal(sdpa_attention_forward(_module(2), query, key, value, None, scaling=SCALE)[0], expected)
