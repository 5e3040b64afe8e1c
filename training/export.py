"""Merge an adapter into its base and save a plain model directory, for servers without LoRA support."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

EXPORT_FILE = "abloop_export.json"


def export_merged(adapter_dir: Path, out_dir: Path, *, base_model_dir: Path) -> Path:
    """Write base + adapter as one safetensors model (with tokenizer) to `out_dir`; return it.

    Merging happens in fp32 on the CPU so the merged weights carry no extra rounding. Refuses an
    `out_dir` that exists and is not empty; the directory appears only once complete.
    """
    import torch
    from peft import PeftModel

    from training.evaluate import load_causal_lm, load_tokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        base = load_causal_lm(base_model_dir, device=torch.device("cpu"), dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(str(tmp))
        tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_model_dir
        load_tokenizer(tokenizer_dir).save_pretrained(str(tmp))
        (tmp / EXPORT_FILE).write_text(
            json.dumps(
                {
                    "adapter": adapter_dir.name,
                    "adapter_dir": str(adapter_dir.resolve()),
                    "base_model_dir": str(Path(base_model_dir).resolve()),
                },
                indent=2,
            ),
            encoding="utf-8",
        )
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above; rename needs it gone
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
