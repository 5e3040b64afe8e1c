"""bench/gpu_train.py runs end to end on CPU (its smoke test), and its MFU arithmetic is the stated one."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_flops_per_token_follow_the_stated_formula():
    from bench.gpu_train import SIZES, flops_per_token
    from training.batching import ModelShape

    shape = ModelShape(vocab=49152, hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3)
    n, n_lora = shape.params, shape.lora_params(16)
    assert flops_per_token("project", n, n_lora) == 4 * n + 6 * n_lora  # frozen weights: no weight gradients
    assert flops_per_token("trl-defaults", n, 0) == 6 * n
    assert SIZES["135M"] == {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
    }


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_gpu_bench_smoke_on_cpu():
    done = subprocess.run(
        [sys.executable, "bench/gpu_train.py", "--device", "cpu", "--sizes", "135M", "--steps", "1", "--batch", "2",
         "--rows", "24"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 135M |")]
    assert [row.split("|")[3].strip() for row in rows] == ["project", "trl-defaults"], done.stdout
    assert all("failed" not in row and "n/a (CPU)" in row for row in rows)
    assert "| 134.5M |" in rows[0]  # the 135M configuration really has SmolLM2-135M's parameter count
