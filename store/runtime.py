"""Where a model runs and in which dtype: one policy for serving, training and the offline gate; and the
garbage collector of a serving process.

torch is imported inside the functions, so `import store` stays light.
"""

from __future__ import annotations

from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def choose_device_dtype(device: str | None = None, dtype: str = "auto") -> tuple[Any, Any]:
    """The device (CUDA when present) and the weights' dtype.

    ``auto`` is bf16 on CUDA and on CPUs that multiply bf16 natively, fp32 on other CPUs (where bf16
    is emulated and slower), as vLLM's and llama.cpp's CPU paths choose. On this project's 2-core
    AVX512-BF16 machine bf16 made a 16 x 300-token prefill 4.2x and a LoRA training step 1.6x faster
    than fp32 (docs/BENCHMARKS.md, "bf16 on CPU").
    """
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype != "auto":
        return dev, getattr(torch, dtype)
    if dev.type == "cuda":
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dev, torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def freeze_startup_heap() -> int:
    """Collect once, then freeze every object alive (`gc.freeze`): for a server, once it has started.

    What a server holds after start-up (its modules, its index, its models' Python objects) lives as long
    as the process, and without this the collector walks all of it again in every full collection, on
    the request path. Frozen objects are still freed by reference counting; only cycles among them stay.
    Measured on the proxy: docs/BENCHMARKS.md, "Observability overhead". Returns how many objects were frozen.
    """
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
