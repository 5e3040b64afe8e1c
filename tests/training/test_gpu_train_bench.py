"""bench/gpu_train.py runs end to end on CPU (its smoke test), and its MFU arithmetic is the stated one."""

import os
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
    # 2-layer smoke shape: the whole path (build, both CPU configurations, the step clock, the table) in seconds.
    configs = "project,project-no-dropout,trl-defaults"
    stdout = _run_bench("gpu_train.py", "--sizes", "smoke", "--steps", "2", "--batch", "2", "--rows", "24",
                        "--configs", configs, bundle=tmp_path, timeout=1400)  # fmt: skip
    rows = [line for line in stdout.splitlines() if line.startswith("| smoke |")]
    assert [row.split("|")[3].strip() for row in rows] == ["project", "project-no-dropout", "trl-defaults"], stdout
    assert ["no dropout" in row for row in rows] == [False, True, False]
    assert all("failed" not in row and "n/a (CPU)" in row for row in rows)
    # Step 2 timed after the first (the warm-up): the callback saw both configurations' steps.
    assert all(row.split("|")[11].strip() not in ("", "n/a (too few steps)") for row in rows), stdout
    assert "and the 2-layer smoke shape" in stdout


def _probe_wheel(folder: Path) -> None:
    """A one-module wheel, `carried_probe` 1.0: what a carried wheel is, minus the size."""
    import zipfile

    folder.mkdir(parents=True)
    files = {
        "carried_probe/__init__.py": "VERSION = '1.0'\n",
        "carried_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: carried-probe\nVersion: 1.0\n",
        "carried_probe-1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    files["carried_probe-1.0.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files) + (
        "carried_probe-1.0.dist-info/RECORD,,\n"
    )
    with zipfile.ZipFile(folder / "carried_probe-1.0-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


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
