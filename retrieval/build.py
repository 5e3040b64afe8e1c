"""Turn documents into a saved index version: chunk, embed, build or extend, save."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.chunker import chunk_text
from retrieval.corpus import Document
from retrieval.embedder import Embedder
from retrieval.index import Chunk, IndexStore, VectorIndex, chunk_id

if TYPE_CHECKING:
    from retrieval.metadata import DocumentMetadata, Extraction

Metadata = Mapping[str, "DocumentMetadata"]  # by document source


def chunk_documents(documents: list[Document], *, max_chars: int = 1000, overlap: int = 150,
                    metadata: Metadata | None = None) -> list[Chunk]:
    """A document's metadata, where given, sets its chunks' title, tags and category."""
    return [
        Chunk(id=chunk_id(doc.source, position, text), source=doc.source, text=text, **_labels(doc, metadata))
        for doc in documents
        for position, text in enumerate(chunk_text(doc.text, max_chars=max_chars, overlap=overlap))
    ]


def _labels(document: Document, metadata: Metadata | None) -> dict[str, Any]:
    found = (metadata or {}).get(document.source)
    if found is None:
        return {"title": document.title}
    return {"title": found.title, "tags": found.tags, "category": found.category}


def embed_chunks(chunks: list[Chunk], embedder: Embedder) -> np.ndarray:
    # The title rides along so a chunk from the middle of a long page still says what it is about.
    texts = [f"{chunk.title}: {chunk.text}" if chunk.title else chunk.text for chunk in chunks]
    return embedder.encode(texts)


def build_index(documents: list[Document], embedder: Embedder, store: IndexStore, *, kind: str = "flat",
                metadata: Metadata | None = None) -> VectorIndex:
    """A fresh index of exactly these documents, saved as the new current version."""
    chunks = chunk_documents(documents, metadata=metadata)
    if not chunks:
        raise ValueError("no text to index: every document is empty")
    index = VectorIndex.build(chunks, embed_chunks(chunks, embedder), kind=kind)
    with store.lock():
        store.save(index)
    return index


def index_version(documents: list[Document], *, index_dir: str, embedding_model: str, kind: str,
                  extraction: Extraction | None = None) -> dict[str, Any]:
    """`build_index` with the embedding model by name, and what it built, as `abloop index build` and the
    `ingest` flow report it (`metadata`: the extraction's counts, None when none was asked for)."""
    from retrieval import embedder  # the class looked up when called, as a test standing in for it needs

    index = build_index(documents, embedder.Embedder(embedding_model), IndexStore(index_dir), kind=kind,
                        metadata=extraction.metadata if extraction is not None else None)
    return {"index_version": index.version, "documents": len(documents), "chunks": len(index), "kind": index.kind,
            "metadata": extraction.counts() if extraction is not None else None}


def add_documents(documents: list[Document], embedder: Embedder, store: IndexStore,
                  metadata: Metadata | None = None) -> VectorIndex:
    """Add to the current version (or a new empty one) and save the result as the new current."""
    return add_embedded(*embed_documents(documents, embedder, metadata), store, embedder.dim)


def embed_documents(documents: list[Document], embedder: Embedder,
                    metadata: Metadata | None = None) -> tuple[list[Chunk], np.ndarray]:
    """The documents' chunks and their embeddings, ready for `add_embedded`."""
    chunks = chunk_documents(documents, metadata=metadata)
    return chunks, embed_chunks(chunks, embedder)


def add_embedded(chunks: list[Chunk], embeddings: np.ndarray, store: IndexStore, dim: int) -> VectorIndex:
    """Extend the current version with chunks already embedded, and save it as the new current.

    Embedding is the slow part and happens before, outside the lock; load-extend-save happens inside
    it, so two writers never both extend the same old version and drop each other's chunks.
    """
    with store.lock():
        if store.current_version() is None:
            current = VectorIndex.build([], np.zeros((0, dim), dtype=np.float32))
        else:
            current = store.load()
        updated = current.with_added(chunks, embeddings)
        if len(updated) == len(current) and store.current_version() is not None:
            return current  # nothing new (already indexed): no pointless new version
        store.save(updated)
    return updated
