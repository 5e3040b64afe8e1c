"""Shared fixtures: the real embedder (loaded once per session) and a fast fake one."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

from retrieval.embedder import Embedder


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    from store.config import default_embedding_model

    return Embedder(default_embedding_model(), device="cpu")


class HashEmbedder:
    """Deterministic, model-free stand-in: a text's vector depends only on the text."""

    def __init__(self, dim: int = 16):
        self.dim = dim
        self.calls: list[list[str]] = []
        self._lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        with self._lock:
            self.calls.append(list(texts))
        rows = [self._vector(text) for text in texts]
        return np.array(rows, dtype=np.float32).reshape(len(texts), self.dim)

    def _vector(self, text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        vector = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return vector / np.linalg.norm(vector)


@pytest.fixture
def hash_embedder() -> HashEmbedder:
    return HashEmbedder()
