"""The proxy's view of the index: the current version in memory, embeddings micro-batched."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from retrieval.fetch import FetchedPage
from retrieval.index import Hit, IndexStore, VectorIndex
from retrieval.metadata import DocumentMetadata


class Retriever:
    """Loads the embedder only once there is an index to search, so a proxy without one starts fast."""

    def __init__(self, index_dir: Path, embedding_model: str, *, max_batch: int = 64, threads: int = 1) -> None:
        self.store = IndexStore(index_dir)
        self._embedding_model = embedding_model
        self._max_batch = max_batch
        self._threads = threads
        self._plain = None  # retrieval.embedder.Embedder, once loaded
        self._batching = None  # its BatchingEmbedder, for the request path
        self._load_lock = asyncio.Lock()
        self.index: VectorIndex | None = None
        self.load_seconds = 0.0  # how long the last (re)load read the index from disk

    @property
    def version(self) -> str | None:
        return self.index.version if self.index is not None else None

    @property
    def size(self) -> int:
        """Chunks in the index in memory (0 without one)."""
        return len(self.index) if self.index is not None else 0

    async def start(self) -> None:
        if self.store.current_version() is not None:
            await self.reload()

    async def stop(self) -> None:
        if self._batching is not None:
            await self._batching.stop()

    async def _embedder(self):
        async with self._load_lock:
            if self._batching is None:
                import torch

                from retrieval.embedder import BatchingEmbedder, Embedder

                torch.set_num_threads(self._threads)
                embedder = await asyncio.to_thread(Embedder, self._embedding_model)
                batching = BatchingEmbedder(embedder, max_batch=self._max_batch)
                await batching.start()
                self._plain, self._batching = embedder, batching
        return self._batching

    async def reload(self) -> VectorIndex:
        await self._embedder()
        started = time.perf_counter()
        self.index = await asyncio.to_thread(self.store.load)
        self.load_seconds = time.perf_counter() - started
        return self.index

    async def maybe_reload(self) -> None:
        current = await asyncio.to_thread(self.store.current_version)
        if current is not None and current != self.version:
            await self.reload()

    async def search(self, query: str, top_k: int) -> list[Hit]:
        index = self.index
        if index is None:
            return []
        vector = await (await self._embedder()).embed(query)
        return index.search(vector, top_k)

    async def add_page(self, page: FetchedPage, metadata: DocumentMetadata | None = None) -> tuple[VectorIndex, int]:
        """Chunk, embed and add one fetched page (with its LLM metadata, if any); the new index and chunks added."""
        from retrieval.build import add_documents
        from retrieval.corpus import Document

        await self._embedder()
        before = self.size
        document = Document(title=page.title or page.final_url, source=page.final_url, text=page.text)
        by_source = {document.source: metadata} if metadata is not None else None
        index = await asyncio.to_thread(add_documents, [document], self._plain, self.store, by_source)
        self.index = index
        return index, len(index) - before
