"""bench/lora_ops.py counts what it says: its table on the smoke shape, and its scaling to depth."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_counts_scale_to_the_depth(monkeypatch):
    from bench.gpu_train import SHAPES
    from bench.lora_ops import casts, count_pass, kernels, scaled

    monkeypatch.setitem(SHAPES, "deeper", {**SHAPES["smoke"], "num_hidden_layers": 5})
    forward, backward = count_pass(SHAPES["deeper"], 5, autocast_inputs=True, lora_dropout=0.05, tokens=16)
    built = {"forward_all": sum(forward.values()), "backward_all": sum(backward.values()),
             "forward_kernels": kernels(forward), "backward_kernels": kernels(backward),
             "forward_casts": casts(forward), "backward_casts": casts(backward)}  # fmt: skip
    assert scaled("deeper", "autocast-inputs", tokens=16) == built


def test_each_option_removes_operators():
    from bench.lora_ops import VARIANTS, scaled

    rows = {variant: scaled("smoke", variant, tokens=16) for variant in VARIANTS}
    total = {v: r["forward_kernels"] + r["backward_kernels"] for v, r in rows.items()}
    assert total["both"] < min(total["autocast-inputs"], total["no-dropout"]) < total["peft-default"]
    casts = {v: r["forward_casts"] + r["backward_casts"] for v, r in rows.items()}
    assert casts["no-dropout"] == casts["peft-default"] > casts["autocast-inputs"] == casts["both"]


def test_the_script_prints_its_table():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "bench/lora_ops.py", "--sizes", "smoke", "--tokens", "16"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| smoke |")]
    assert [row.split("|")[2].strip() for row in rows] == ["peft-default", "autocast-inputs", "no-dropout", "both"]
    assert rows[0].rstrip(" |").endswith("1.000")
