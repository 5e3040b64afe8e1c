"""4-bit (QLoRA) training through the real bitsandbytes, transformers, peft and trl, on CPU.

bitsandbytes (the `gpu` extra) lives outside the test environment's path (`make install` puts it in
.venv/gpu-extra): installed there, peft would import it with every training run. So these runs are
subprocesses with it on their path. bitsandbytes' CPU backend quantises and computes as its CUDA
kernels would (slowly); what CUDA alone runs — the kernels, the memory plan — is bench/gpu_train.py's
`project-4bit` on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.conftest import simulated_dataset
from training.train import LORA_TARGETS

ROOT = Path(__file__).resolve().parents[2]
GPU_EXTRA = Path(sys.prefix) / "gpu-extra"

# train_lora refuses 4-bit without CUDA (tests/training/test_train.py): the run below swaps in a
# loader that places the same quantised base on the CPU and notes what it loaded; everything after
# the load is train_lora's.
_SCRIPT = """
import json, sys
from pathlib import Path
import torch
import bitsandbytes
from safetensors.torch import load_file
import training.train as train

base, data, out = map(Path, sys.argv[1:4])
report = {}

def on_cpu(base_dir, device, dtype, load_in_4bit, attention, checkpointing):
    assert load_in_4bit
    extra = {"attn_implementation": attention} if attention else {}
    model = train.load_quantised_base(base_dir, dtype, device_map={"": "cpu"}, checkpointing=checkpointing, **extra)
    quantised = [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
    report.update(  # the base as train_lora gets it, before peft adds the adapters
        quantised=len(quantised),
        quant_types=sorted({m.weight.quant_state.quant_type for m in quantised}),
        double_quantised=all(m.weight.quant_state.nested for m in quantised),
        trainable_before_lora=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    return model

train._load_base = on_cpu
run = train.train_lora(data, out, base_model_dir=base, max_steps=3, batch_size=2, load_in_4bit=True)
weights = load_file(str(out / run.name / "adapter_model.safetensors"))
report["adapter_tensors"] = sorted(weights)
report["lora_b_moved"] = sum(bool(t.abs().sum() > 0) for k, t in weights.items() if "lora_B" in k)
report["params"] = run.metrics["params"]
report["train_loss"] = run.metrics["train_loss_final"]
report["holdout"] = run.metrics["holdout"]
print("QLORA " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return simulated_dataset(tmp_path_factory.mktemp("qlora"), n_queries=40, seed=3)


@pytest.mark.slow
def test_lora_trains_on_a_4bit_nf4_base(tiny_model_dir, data_dir, tmp_path):
    assert (GPU_EXTRA / "bitsandbytes").is_dir(), f"{GPU_EXTRA} lacks bitsandbytes: run `make install`"
    path = os.pathsep.join([str(GPU_EXTRA), str(ROOT), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tiny_model_dir), str(data_dir), str(tmp_path / "adapters")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": path},
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.split("QLORA ", 1)[1])

    layers = 2  # tiny_model_dir's
    assert report["quantised"] == len(LORA_TARGETS) * layers  # every projection, not the tied LM head
    assert report["quant_types"] == ["nf4"] and report["double_quantised"]
    assert report["trainable_before_lora"] == 0  # prepare_model_for_kbit_training froze the base

    lora = [k for k in report["adapter_tensors"] if "lora_" in k]
    assert len(lora) == 2 * len(LORA_TARGETS) * layers and len(lora) == len(report["adapter_tensors"])
    assert report["lora_b_moved"] == len(LORA_TARGETS) * layers  # B starts at zero: every adapter trained
    assert report["params"]["load_in_4bit"] is True
    assert 0 < report["train_loss"] < 20  # a finite cross-entropy over a 49k vocabulary (ln 49152 ≈ 10.8)
    assert report["holdout"]["loss_adapter"] is not None
