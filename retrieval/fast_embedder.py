"""Query embeddings on ONNX Runtime or OpenVINO: the sentence-transformers model, exported once to ONNX.

The same graph on ONNX Runtime (attention, GELU and layer norms fused) or on OpenVINO (bf16 where
the CPU computes it natively) costs a fraction of torch's CPU per query and finds the same nearest
chunks (docs/BENCHMARKS.md, "Query embeddings"). The export is built locally on first use, from the
very model directory the index was embedded with, and cached under `$ABLOOP_CACHE_DIR` (default
`~/.cache/abloop`) in `embeddings/<model>-<digest>/`; later starts only load it. Pooling and
normalisation are part of the exported graph, so both backends return what `Embedder.encode` does.

int8 variants (dynamic on ONNX Runtime, static on OpenVINO) were measured too and are not offered:
they moved too many nearest neighbours (bench/query_embedding.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.embedder import Embedder, encode_in_batches
from store.cachedir import build_once

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "openvino")
ONNX_FILE = "model.onnx"  # the plain export: OpenVINO reads it
ORT_FILE = "model_ort.onnx"  # the same graph with ONNX Runtime's transformer fusions
META_FILE = "meta.json"
# Part of the cache key: bump it when the export changes, so no replica loads an export made the old way.
_EXPORT_FORMAT = 1
# The export must reproduce the torch model; a graph that drifts further than this is refused.
_EXPORT_MIN_COSINE = 0.9999
_PROBES = (
    "How do I write a list comprehension?",
    "The with statement wraps the execution of a block with methods defined by a context manager.",
    "",
    "tabs\tand\nnewlines  ",
)
# Architectures whose attention ONNX Runtime's BERT fuser recognises (onnxruntime.transformers.optimizer).
_FUSABLE = frozenset({"bert", "roberta", "xlm-roberta"})


def load_query_embedder(model_name_or_path: str, backend: str = "torch", *, threads: int = 1,
                        cache_dir: Path | None = None) -> Any:
    """An embedder with `dim` and `encode(texts)` on the chosen backend (`BACKENDS`).

    `threads`: intra-op threads of ONNX Runtime or OpenVINO (torch's are process-wide: `torch.set_num_threads`).
    """
    if backend == "torch":
        return Embedder(model_name_or_path)
    if backend == "onnx":
        return OnnxRuntimeEmbedder(model_name_or_path, threads=threads, cache_dir=cache_dir)
    if backend == "openvino":
        return OpenVinoEmbedder(model_name_or_path, threads=threads, cache_dir=cache_dir)
    raise ValueError(f"unknown embedding backend {backend!r}: expected one of {', '.join(BACKENDS)}")


class _ExportedEmbedder:
    """What both backends share: the cached export, its tokenizer, batching and a lock."""

    def __init__(self, model_name_or_path: str, cache_dir: Path | None) -> None:
        from transformers import AutoTokenizer

        self.model_name_or_path = model_name_or_path
        self.export_dir = export_onnx(model_name_or_path, cache_dir)
        self.meta: dict[str, Any] = json.loads((self.export_dir / META_FILE).read_text())
        self.dim: int = int(self.meta["dim"])
        self._inputs: list[str] = list(self.meta["inputs"])
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.export_dir))
        # The tokenizer is not safe to share between threads, and neither is an OpenVINO request.
        self._lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return encode_in_batches(texts, batch_size, self.dim, self._forward)

    def _forward(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            features = _features(self._tokenizer, texts, self._inputs)
            return np.array(self._run(features), dtype=np.float32)  # a copy: the runtime reuses its buffers

    def _run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class OnnxRuntimeEmbedder(_ExportedEmbedder):
    """fp32 on ONNX Runtime's CPU provider, `threads` intra-op threads that sleep when idle.

    `graph` replaces the exported graph with another of the same inputs (bench/query_embedding.py
    measures int8 ones); by default it is the fused fp32 export.
    """

    backend = "onnx"

    def __init__(self, model_name_or_path: str, *, threads: int = 1, cache_dir: Path | None = None,
                 graph: Path | None = None) -> None:
        import onnxruntime as ort

        super().__init__(model_name_or_path, cache_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning workers would steal the event loop's core on a small machine (as OMP_WAIT_POLICY).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        graph = graph or self.export_dir / self.meta["ort_file"]
        self._session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def _run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return self._session.run(None, features)[0]


class OpenVinoEmbedder(_ExportedEmbedder):
    """OpenVINO's CPU plugin on the plain export (or `graph`: an .onnx or .xml of the same inputs).

    `precision` None leaves it to the plugin: bf16 where the CPU computes it natively (AVX-512 BF16,
    AMX), about twice as fast as f32 there (bench/query_embedding.py), and near-ties among a query's
    neighbours can swap (on a Xeon with AMX: one neighbour in 300, tests/retrieval/test_fast_embedder.py);
    f32 elsewhere. "f32" forces exact arithmetic: torch's neighbours.
    """

    backend = "openvino"

    def __init__(self, model_name_or_path: str, *, threads: int = 1, cache_dir: Path | None = None,
                 precision: str | None = None, graph: Path | None = None) -> None:
        import openvino as ov

        super().__init__(model_name_or_path, cache_dir)
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        compiled = ov.Core().compile_model(str(graph or self.export_dir / ONNX_FILE), "CPU", config)
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self._request = compiled.create_infer_request()

    def _run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return self._request.infer(features)[0]


def _features(tokenizer: Any, texts: list[str], inputs: list[str]) -> dict[str, np.ndarray]:
    # The settings sentence-transformers tokenizes text with; max length is the saved tokenizer's.
    encoded = tokenizer(texts, padding=True, truncation="longest_first", return_tensors="np")
    return {name: encoded[name].astype(np.int64, copy=False) for name in inputs}


# --------------------------------------------------------------------------------------------
# Export, once per model directory


def cache_root() -> Path:
    """`$ABLOOP_CACHE_DIR` or `~/.cache/abloop`: where serving/ keeps its converted model too."""
    env = os.environ.get("ABLOOP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "abloop"


def export_dir_for(model_name_or_path: str, cache_dir: Path | None = None) -> Path:
    """`<cache>/embeddings/<model>-<digest>`; the digest changes when the model's files do."""
    source = Path(model_name_or_path).expanduser()
    digest = hashlib.sha256(_fingerprint(source, model_name_or_path).encode()).hexdigest()[:12]
    name = source.name if source.name not in ("", "model") else source.parent.name
    return (cache_dir or cache_root()) / "embeddings" / f"{name or 'model'}-{digest}"


def _fingerprint(source: Path, name: str) -> str:
    if not source.is_dir():
        return f"{_EXPORT_FORMAT}\n{name}"
    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
    return "\n".join([str(_EXPORT_FORMAT), str(source.resolve())]
                     + [f"{p.relative_to(source)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files])


def export_onnx(model_name_or_path: str, cache_dir: Path | None = None) -> Path:
    """The export directory for this model, built on first call: ONNX graph, tokenizer, meta.json.

    Built once (store.cachedir): concurrent first starts (several replicas, several test workers) wait
    for one export and use it.
    """
    out = export_dir_for(model_name_or_path, cache_dir)

    def export(tmp: Path) -> None:
        log.info("exporting %s to ONNX in %s (once)", model_name_or_path, out)
        _export_into(model_name_or_path, tmp)

    return build_once(out, lambda path: (path / META_FILE).is_file(), export)


def _export_into(model_name_or_path: str, out: Path) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    # Eager attention traces to the pattern ONNX Runtime's fuser knows; SDPA does not fuse.
    model = SentenceTransformer(model_name_or_path, device="cpu", model_kwargs={"attn_implementation": "eager"})
    model.eval()
    tokenizer = model.tokenizer
    # Padding in the example keeps the attention mask in the traced graph for every batch.
    example = tokenizer(["a short probe", "a somewhat longer probe sentence with padding"], padding=True,
                        truncation="longest_first", return_tensors="pt")
    inputs = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in example]
    axes = {name: {0: "batch", 1: "tokens"} for name in inputs}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(_pooled(model, inputs), tuple(example[name] for name in inputs), str(out / ONNX_FILE),
                          input_names=inputs, output_names=["embedding"],
                          dynamic_axes={**axes, "embedding": {0: "batch"}}, opset_version=17, dynamo=False)
    tokenizer.save_pretrained(str(out))
    expected = model.encode(list(_PROBES), convert_to_numpy=True, normalize_embeddings=True)
    _check_export(out / ONNX_FILE, tokenizer, inputs, expected)
    ort_file = ONNX_FILE
    config = getattr(model[0], "config", None)
    if getattr(config, "model_type", None) in _FUSABLE:
        _fuse(out, config.num_attention_heads, config.hidden_size)
        try:
            _check_export(out / ORT_FILE, tokenizer, inputs, expected)
            ort_file = ORT_FILE
        except RuntimeError as error:
            # The plain graph is correct, only slower on ONNX Runtime: keep it rather than fail.
            log.warning("not using ONNX Runtime's fused graph: %s", error)
            (out / ORT_FILE).unlink()
    meta = {"source": str(model_name_or_path), "dim": int(expected.shape[1]), "inputs": inputs, "ort_file": ort_file}
    (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def _pooled(model: Any, inputs: list[str]) -> Any:
    """The model with pooling and L2 normalisation, taking its inputs as positional tensors."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            features = self.model(dict(zip(inputs, tensors, strict=True)))
            return torch.nn.functional.normalize(features["sentence_embedding"], p=2, dim=1)

    return Pooled()


def _fuse(out: Path, num_heads: int, hidden_size: int) -> None:
    """ONNX Runtime's transformer fusions (attention, GELU, layer norm) of the plain export, into ORT_FILE."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(out / ONNX_FILE), model_type="bert", num_heads=num_heads, hidden_size=hidden_size)
    optimized.save_model_to_file(str(out / ORT_FILE))


def _check_export(graph: Path, tokenizer: Any, inputs: list[str], expected: np.ndarray) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    got = session.run(None, _features(tokenizer, list(_PROBES), inputs))[0]
    cosine = float((got * expected).sum(axis=1).min())
    if cosine < _EXPORT_MIN_COSINE:
        raise RuntimeError(f"{graph.name} does not reproduce the torch model (min cosine {cosine:.5f})")
