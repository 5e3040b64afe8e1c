"""bench/gpu_train.py runs end to end on CPU (its smoke test), and its MFU arithmetic is the stated one."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_rate_after_warm_up_leaves_the_first_steps_out():
    from bench.gpu_train import after_warmup

    # 40 steps, 1,000 tokens each; the first 5 take 3 s each, the rest 0.5 s.
    times = [3.0 * min(step, 5) + 0.5 * max(step - 5, 0) for step in range(1, 41)]
    points = [(t, step, 1000 * step) for t, step in zip(times, range(1, 41), strict=True)]
    steady = after_warmup(points, steps=40)
    assert steady == {"steady_tokens_per_s": 2000.0, "steady_step_s": 0.5, "warmup_steps": 5}
    assert after_warmup(points[:1], steps=1)["steady_tokens_per_s"] is None  # nothing after the warm-up


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


def test_the_135m_configuration_has_smollm2_135ms_parameters():
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from bench.gpu_train import llama_config
    from serving.model import resolve_base_model
    from training.batching import ModelShape

    config = llama_config("135M", AutoTokenizer.from_pretrained(str(resolve_base_model("default"))))
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        counted = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert counted == ModelShape.from_config(config).params
    assert f"{counted / 1e6:,.1f}M" == "134.5M"  # SmolLM2-135M's count, tied embeddings once


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_gpu_bench_smoke_on_cpu(tmp_path):
    # An empty --bundle: this environment's packages, whatever a developer prepared in bench/.carry. The
    # 2-layer smoke shape: the whole path (build, both CPU configurations, the step clock, the table) in seconds;
    # what the other configurations change is test_each_project_configuration_asks_the_trainer_for_its_change's.
    stdout = _run_bench("gpu_train.py", "--sizes", "smoke", "--steps", "2", "--batch", "2", "--rows", "24",
                        "--passages", "1", bundle=tmp_path, timeout=1400)  # fmt: skip
    rows = [line for line in stdout.splitlines() if line.startswith("| smoke |")]
    assert [row.split("|")[3].strip() for row in rows] == ["project", "trl-defaults"], stdout
    assert all("failed" not in row and "n/a (CPU)" in row for row in rows)
    # Step 2 timed after the first (the warm-up): the callback saw both configurations' steps.
    assert all(row.split("|")[11].strip() not in ("", "n/a (too few steps)") for row in rows), stdout
    assert "and the 2-layer smoke shape" in stdout


def test_each_project_configuration_asks_the_trainer_for_its_change_and_says_so(monkeypatch, tmp_path):
    """What `--_run CONFIG` passes to train_lora and the mode it reports, with the trainer echoing its options."""
    import argparse
    from types import SimpleNamespace

    import bench.gpu_train as bench
    import training.train

    asked = []

    def echo(data, out, **options):
        asked.append({"data": data, "out": out, **options})
        params = {
            "lora_r": 16,
            "packing": options["packing"] is not False,
            "attention": options["attention"] or "varlen",
            "torch_compile": options["torch_compile"],
            "lora_dropout": options.get("lora_dropout", 0.05),
            "load_in_4bit": options["load_in_4bit"],
            "dtype": "bfloat16",
            "gradient_checkpointing": False,
            "per_device_batch_size": options.get("batch_size", 4),
            "gradient_accumulation_steps": 1,
        }
        return SimpleNamespace(metrics={"params": params, "train_tokens": 300, "train_runtime_s": 2.0,
                                        "tokens_per_s": 150.0})  # fmt: skip

    monkeypatch.setattr(training.train, "train_lora", echo)
    modes = {}
    for config in [c for c in bench.CONFIGS if c.startswith("project")]:
        args = argparse.Namespace(_run=config, steps=3, seed=7, batch=None if config != "project" else 8)
        result = bench._project(tmp_path / "data", tmp_path / "base", tmp_path / "out", args, clock="the clock")
        modes[config] = result["mode"]
        assert result["batch"] == ("8x1" if config == "project" else "4x1") and result["lora_r"] == 16
        assert (result["tokens"], result["runtime_s"], result["tokens_per_s"]) == (300, 2.0, 150.0)
    base = {"data": tmp_path / "data", "out": tmp_path / "out", "base_model_dir": tmp_path / "base", "max_steps": 3,
            "seed": 7, "packing": None, "attention": None, "torch_compile": False, "callbacks": ["the clock"],
            "load_in_4bit": False}  # fmt: skip
    assert asked == [
        {**base, "batch_size": 8},
        {**base, "attention": "sdpa"},
        {**base, "packing": False},
        {**base, "torch_compile": True},
        {**base, "lora_dropout": 0.0},
        {**base, "load_in_4bit": True},
    ]
    assert modes == {
        "project": "LoRA r=16, packed (varlen)",
        "project-sdpa": "LoRA r=16, packed (sdpa)",
        "project-padded": "LoRA r=16, padded",
        "project-compiled": "LoRA r=16, packed (varlen), compiled",
        "project-no-dropout": "LoRA r=16, packed (varlen), no dropout",
        "project-4bit": "LoRA r=16, packed (varlen), 4-bit NF4 base",
    }


def _probe_wheel(folder: Path, extra: dict[str, str] | None = None) -> Path:
    """A one-module wheel, `carried_probe` 1.0: what a carried wheel is, minus the size."""
    import zipfile

    folder.mkdir(parents=True)
    files = {
        "carried_probe/__init__.py": "VERSION = '1.0'\n",
        **(extra or {}),
        "carried_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: carried-probe\nVersion: 1.0\n",
        "carried_probe-1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    files["carried_probe-1.0.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files) + (
        "carried_probe-1.0.dist-info/RECORD,,\n"
    )
    path = folder / "carried_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


def test_slim_drops_the_chosen_files_and_their_record_lines_and_pip_installs_the_rest(tmp_path):
    import zipfile

    import bench.carry as carry

    libraries = {"carried_probe/lib_cuda118.so": "old", "carried_probe/lib_cuda130.so": "kept"}
    wheel = _probe_wheel(tmp_path / "wheels", extra=libraries)
    assert carry.slim(wheel, drop=lambda name: name.endswith("cuda118.so")) == ["carried_probe/lib_cuda118.so"]
    with zipfile.ZipFile(wheel) as slimmed:
        names = slimmed.namelist()
        record = slimmed.read("carried_probe-1.0.dist-info/RECORD").decode()
    assert "carried_probe/lib_cuda118.so" not in names and "carried_probe/lib_cuda130.so" in names
    assert "lib_cuda118" not in record and "carried_probe/lib_cuda130.so,," in record
    assert len(record.splitlines()) == 5  # __init__, the kept library, METADATA, WHEEL, RECORD
    assert carry.slim(wheel, drop=lambda name: False) == []  # nothing to drop: the wheel is left as it is
    site = tmp_path / "site"
    install = ["install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(site), str(wheel)]
    subprocess.run([sys.executable, "-m", "pip", *install], check=True)
    assert sorted(p.name for p in (site / "carried_probe").iterdir()) == ["__init__.py", "lib_cuda130.so"]
    assert (site / "carried_probe" / "lib_cuda130.so").read_text() == "kept"


def test_constraint_pins_take_exact_pins_only(tmp_path):
    import bench.carry as carry

    constraints = tmp_path / "constraints.txt"
    constraints.write_text(
        "# pins\ntorch==2.13.0\nfastapi>=0.143,<0.151\nBitsAndBytes == 0.50.2  # why\nPython_Dotenv==1.2\n"
    )
    assert carry.constraint_pins(constraints, ["bitsandbytes", "torch", "python.dotenv"]) == {
        "bitsandbytes": "0.50.2",
        "torch": "2.13.0",
        "python.dotenv": "1.2",
    }
    with pytest.raises(SystemExit, match="fastapi, peft: no exact pin"):
        carry.constraint_pins(constraints, ["fastapi", "peft", "torch"])


def test_the_carried_bitsandbytes_keeps_the_gpu_machines_library_and_all_its_code():
    """Against the real wheel's file list (the one `make install` put in .venv/gpu-extra)."""
    import importlib.metadata

    from bench.carry import constraint_pins
    from bench.gpu_train import CARRIED_EXTRA, _other_bnb_library

    found = list(importlib.metadata.distributions(path=[str(Path(sys.prefix) / "gpu-extra")]))
    (bnb,) = [d for d in found if d.metadata["Name"] == "bitsandbytes"]
    assert constraint_pins(ROOT / "constraints.txt", CARRIED_EXTRA) == {"bitsandbytes": bnb.version}
    names = [str(f) for f in bnb.files]
    kept = [n for n in names if not _other_bnb_library(n)]
    libraries = sorted(n for n in kept if n.endswith(".so"))
    assert libraries == ["bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"]
    assert len([n for n in names if n.endswith(".so")]) > 10  # the wheel ships many builds; one CUDA one stays
    assert all(not _other_bnb_library(n) for n in names if not n.endswith(".so"))  # every module stays


_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from bench import carry
carry.activate(Path(sys.argv[1]), sys.argv)
import carried_probe, importlib.metadata
print("CARRIED", carried_probe.__file__, importlib.metadata.version("carried-probe"), sys.argv[2:])
"""


@pytest.mark.parametrize("python", ["this", "other"])
def test_carried_wheels_are_installed_and_the_script_runs_again_with_them(tmp_path, python):
    import bench.carry as carry

    bundle = tmp_path / "bundle"
    _probe_wheel(carry.wheels_dir(bundle))
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    (carry.wheels_dir(bundle) / "PYTHON").write_text(running if python == "this" else "2.7")
    script = tmp_path / "script.py"
    script.write_text(_SCRIPT.format(root=str(ROOT)))
    done = subprocess.run(
        [sys.executable, str(script), str(bundle), "--an", "argument"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    if python == "other":  # a bundle for the GPU machine's Python, seen here: left alone, said so
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr
        assert "holds wheels for Python 2.7" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    location, version, argv = done.stdout.split("CARRIED ")[1].split(" ", 2)
    assert location.startswith(str(tmp_path / "abloop-carried-")) and version == "1.0"
    assert argv.strip() == "['--an', 'argument']"  # the re-run got the same arguments


def test_configs_are_checked_before_anything_runs():
    from bench.gpu_train import CPU_CONFIGS, _configs, _parser

    def configs(*argv):
        return _configs(_parser().parse_args(list(argv)))

    assert configs() == ("project", "project-sdpa", "trl-defaults")  # CUDA; the padded row on request
    assert configs("--device", "cpu") == CPU_CONFIGS
    assert configs("--device", "cpu", "--configs", "project-compiled") == ("project-compiled",)
    assert configs("--device", "cpu", "--configs", "project-no-dropout") == ("project-no-dropout",)
    assert configs("--configs", "project,project-4bit") == ("project", "project-4bit")
    with pytest.raises(SystemExit, match="project-4bit"):
        configs("--device", "cpu", "--configs", "project-4bit")  # 4-bit needs CUDA (bitsandbytes)
    assert configs("--configs", "trl-defaults, project-padded") == ("trl-defaults", "project-padded")
    with pytest.raises(SystemExit, match="project-sdpa"):
        configs("--device", "cpu", "--configs", "project,project-sdpa")  # the CPU path pads: no packed SDPA row


@pytest.mark.slow
def test_gpu_profile_smoke_on_cpu(tmp_path):
    # bench/gpu_profile.py's wiring (build, train_lora with the profiling callback, the report); on
    # CPU there is no launch-cost measurement and no GPU table.
    stdout = _run_bench("gpu_profile.py", "--size", "smoke", "--skip", "2", "--profile", "2", "--rows", "60",
                        bundle=tmp_path, timeout=600)  # fmt: skip
    assert "smoke, batch 4: 2 steps profiled in" in stdout
    assert "aten::mm" in stdout and "launch cost" not in stdout


def _run_bench(script: str, *args: str, bundle: Path, timeout: int) -> str:
    """bench/`script` on CPU with an empty carried bundle; its stdout, once it has exited 0."""
    done = subprocess.run(
        [sys.executable, f"bench/{script}", "--device", "cpu", *args, "--bundle", str(bundle)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_gpu_session_script_runs_its_steps_within_the_budget_and_skips_what_does_not_fit(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text('#!/bin/sh\necho "ran: $*"\n')
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "name, memory.total"\necho "Fake GPU, 1 MiB"\n')
    for tool in fake.iterdir():
        tool.chmod(0o755)

    def session(budget: int) -> str:
        out = tmp_path / f"out-{budget}"
        env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(out), "BUDGET_S": str(budget)}
        done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh")], env=env, capture_output=True,
                              text=True, timeout=60, cwd=ROOT)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return out

    out = session(600)
    assert "Fake GPU" in (out / "gpu.txt").read_text()
    first = (out / "train_1.7B_b16.txt").read_text()
    assert "--sizes 1.7B --batch 16 --configs project,project-no-dropout,project-4bit" in first
    assert "--peak-tflops 989" in first
    assert "--compile --skip 12" in (out / "profile_1.7B_compiled.txt").read_text()
    assert (out / "session.txt").read_text().count("ended with 0") == 4

    short = session(120)  # too little for the first two steps, enough for the last two
    log = (short / "session.txt").read_text()
    # `left` is whole seconds of bash's SECONDS: a loaded machine can tick one over before the first step.
    assert re.search(r"train_1\.7B_b16 skipped: 1(20|19)s left", log) and "train_1.7B_b16_compiled skipped" in log
    assert not (short / "train_1.7B_b16.txt").exists() and (short / "train_1.7B_b32_no_dropout.txt").exists()
