"""The device and dtype policy that serving, training and the offline gate share."""

from __future__ import annotations

import pytest

from store.runtime import choose_device_dtype


def test_dtype_choice(monkeypatch):
    import torch

    import store.runtime

    assert choose_device_dtype("cpu", "float32") == (torch.device("cpu"), torch.float32)
    assert choose_device_dtype("cpu", "bfloat16")[1] is torch.bfloat16
    monkeypatch.setattr(store.runtime, "cpu_has_native_bf16", lambda: True)
    assert choose_device_dtype("cpu")[1] is torch.bfloat16  # auto: native bf16 is faster than fp32
    monkeypatch.setattr(store.runtime, "cpu_has_native_bf16", lambda: False)
    assert choose_device_dtype("cpu")[1] is torch.float32  # auto: emulated bf16 would be slower
    with pytest.raises(ValueError, match="dtype must be one of"):
        choose_device_dtype("cpu", "int4")


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bfloat16"), (False, "float16")])
def test_a_visible_gpu_is_chosen_with_its_fastest_half_precision(monkeypatch, bf16, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)  # pre-Ampere GPUs: fp16
    device, dtype = choose_device_dtype()
    assert device == torch.device("cuda") and dtype is getattr(torch, expected)
    assert choose_device_dtype(dtype="float32")[1] is torch.float32  # an explicit dtype wins on CUDA too
