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
