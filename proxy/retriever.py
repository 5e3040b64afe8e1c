"""The proxy's view of the index: the current version in memory, query embeddings micro-batched and cached."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from retrieval.embedder import BatchingEmbedder
from retrieval.fetch import FetchedPage
from retrieval.index import Hit, IndexStore, VectorIndex
from retrieval.metadata import DocumentMetadata
from store import tracing

log = logging.getLogger(__name__)


class Retriever:
    """Loads the embedder only once there is an index to search, so a proxy without one starts fast.

    Queries are embedded on `backend` (retrieval.fast_embedder.BACKENDS); chunks that `add_page`
    indexes always go through torch, as `abloop index build` embeds them, so both stay in one space.
    """

    def __init__(self, index_dir: Path, embedding_model: str, *, max_batch: int = 64, threads: int = 1,
                 backend: str = "torch", cache_size: int = 0) -> None:
        self.store = IndexStore(index_dir)
        self._embedding_model = embedding_model
        self._max_batch = max_batch
        self._threads = threads
        self._backend = backend
        self._cache_size = cache_size
        self._plain = None  # retrieval.embedder.Embedder (torch), for indexing; loaded on first use
        self._batching = None  # the query embedder's BatchingEmbedder, for the request path
        self._load_lock = asyncio.Lock()
        # Whoever reads the store and installs what it read holds this, so an ingest's new index is
        # never replaced by a background reload that read the version before it.
        self._swapping = asyncio.Lock()
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
                embedder = await asyncio.to_thread(self._load_query_embedder)
                batching = BatchingEmbedder(embedder, max_batch=self._max_batch, cache_size=self._cache_size)
                await batching.start()
                self._batching = batching
        return self._batching

    def _load_query_embedder(self):
        from retrieval.fast_embedder import load_query_embedder

        if self._backend != "torch":
            try:
                return load_query_embedder(self._embedding_model, self._backend, threads=self._threads)
            except (ImportError, RuntimeError, OSError) as error:
                # A proxy that serves on torch is better than one that never gets ready.
                log.warning("embedding backend %s unavailable (%s); queries use torch", self._backend, error)
        self._plain = self._plain or self._load_torch()
        return self._plain

    async def document_embedder(self):
        """EMBEDDING_MODEL on torch, loaded once on first use: for pages added to the index, and for texts the
        admin routes compare (auto-tune's near-duplicate check), so that every comparison is in the index's space."""
        async with self._load_lock:
            if self._plain is None:
                self._plain = await asyncio.to_thread(self._load_torch)
        return self._plain

    def _load_torch(self):
        import torch

        from retrieval.embedder import Embedder

        torch.set_num_threads(self._threads)
        return Embedder(self._embedding_model)

    async def reload(self) -> VectorIndex:
        await self._embedder()
        async with self._swapping:
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
        with tracing.span("embed query"):
            vector = await (await self._embedder()).embed(query)
        with tracing.span("faiss search", {"abloop.top_k": top_k, "abloop.index_version": index.version}):
            return index.search(vector, top_k)

    async def add_page(self, page: FetchedPage, metadata: DocumentMetadata | None = None) -> tuple[VectorIndex, int]:
        """Chunk, embed and add one fetched page (with its LLM metadata, if any); the new index and chunks added."""
        from retrieval.build import add_embedded, embed_documents
        from retrieval.corpus import Document

        embedder = await self.document_embedder()
        document = Document(title=page.title or page.final_url, source=page.final_url, text=page.text)
        by_source = {document.source: metadata} if metadata is not None else None
        chunks, embeddings = await asyncio.to_thread(embed_documents, [document], embedder, by_source)
        # Only the store's read-extend-write and the swap hold the lock: a reload (and so the
        # experiment refresh after it) waits for that, not for the page's embedding.
        async with self._swapping:
            before = self.size
            index = await asyncio.to_thread(add_embedded, chunks, embeddings, self.store, embedder.dim)
            self.index = index
        return index, len(index) - before
