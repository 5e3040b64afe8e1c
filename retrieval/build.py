"""Turn documents into a saved index version: chunk, embed, build or extend, save."""

from __future__ import annotations

import numpy as np

from retrieval.chunker import chunk_text
from retrieval.corpus import Document
from retrieval.embedder import Embedder
from retrieval.index import Chunk, IndexStore, VectorIndex, chunk_id


def chunk_documents(documents: list[Document], *, max_chars: int = 1000, overlap: int = 150) -> list[Chunk]:
    return [
        Chunk(id=chunk_id(doc.source, position, text), title=doc.title, source=doc.source, text=text)
        for doc in documents
        for position, text in enumerate(chunk_text(doc.text, max_chars=max_chars, overlap=overlap))
    ]


def embed_chunks(chunks: list[Chunk], embedder: Embedder) -> np.ndarray:
    # The title rides along so a chunk from the middle of a long page still says what it is about.
    texts = [f"{chunk.title}: {chunk.text}" if chunk.title else chunk.text for chunk in chunks]
    return embedder.encode(texts)


def build_index(documents: list[Document], embedder: Embedder, store: IndexStore, *, kind: str = "flat") -> VectorIndex:
    """A fresh index of exactly these documents, saved as the new current version."""
    chunks = chunk_documents(documents)
    if not chunks:
        raise ValueError("no text to index: every document is empty")
    index = VectorIndex.build(chunks, embed_chunks(chunks, embedder), kind=kind)
    with store.lock():
        store.save(index)
    return index


def add_documents(documents: list[Document], embedder: Embedder, store: IndexStore) -> VectorIndex:
    """Add to the current version (or a new empty one) and save the result as the new current.

    Embedding happens outside the lock (it is the slow part); load-extend-save happens inside
    it, so two writers never both extend the same old version and drop each other's chunks.
    """
    chunks = chunk_documents(documents)
    embeddings = embed_chunks(chunks, embedder)
    with store.lock():
        if store.current_version() is None:
            current = VectorIndex.build([], np.zeros((0, embedder.dim), dtype=np.float32))
        else:
            current = store.load()
        updated = current.with_added(chunks, embeddings)
        if len(updated) == len(current) and store.current_version() is not None:
            return current  # nothing new (already indexed): no pointless new version
        store.save(updated)
    return updated
