"""Training: dataset building from logs and feedback, selection, synthetic QA, LoRA fine-tuning,
offline evaluation and adapter export.

Imports only `store` and `retrieval`. Heavy libraries (torch, transformers, peft, trl, datasets)
are imported inside the functions that need them, so importing this package stays fast.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Encoder(Protocol):
    """Anything that turns texts into L2-normalised float32 rows (retrieval.embedder.Embedder does)."""

    def encode(self, texts: list[str]) -> np.ndarray: ...


def default_encoder() -> Encoder:
    """The configured sentence embedder (EMBEDDING_MODEL, else the bundled all-MiniLM-L6-v2)."""
    from retrieval.embedder import Embedder
    from store.config import Settings

    return Embedder(Settings().embedding_model)
