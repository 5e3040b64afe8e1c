"""The proxy's retriever as one unit: which embedder it loads, when it reloads, what an ingested page becomes.

The store's reads and writes and the embedders are stand-ins; tests/proxy/test_retrieval_api.py runs the
real ones (real embeddings, real FAISS; marked slow).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import SimpleNamespace

import pytest

from proxy.retriever import Retriever
from retrieval import build, fast_embedder
from retrieval.fetch import FetchedPage
from retrieval.metadata import DocumentMetadata

MODEL = "a-model-dir"


class _Index(SimpleNamespace):
    """What the retriever holds, reduced to what these tests read."""

    def __len__(self):
        return self.n


PAGE = FetchedPage(url="https://example.org/a", final_url="https://example.org/a", content_type="text/html",
                   title="A", text="a page")


def _index(version: str, n: int = 3) -> _Index:
    return _Index(version=version, n=n)


def _retriever(tmp_path, monkeypatch, *, load, embed, add) -> Retriever:
    """A retriever whose store reads, embedding and store writes are the given stand-ins (no model loads)."""
    retriever = Retriever(tmp_path, MODEL)
    retriever._batching = object()
    retriever._plain = SimpleNamespace(dim=4)
    monkeypatch.setattr(retriever.store, "load", load)
    monkeypatch.setattr(build, "embed_documents", embed)
    monkeypatch.setattr(build, "add_embedded", add)
    return retriever


def _with_torch(retriever: Retriever, monkeypatch) -> list[object]:
    """Makes `_load_torch` return a new stand-in each call; the list holds those made."""
    made: list[object] = []

    def load_torch():
        made.append(object())
        return made[-1]

    monkeypatch.setattr(retriever, "_load_torch", load_torch)
    return made


def test_a_fast_backend_loads_with_the_model_backend_and_threads_given(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(fast_embedder, "load_query_embedder",
                        lambda *args, **kwargs: asked.append((args, kwargs)) or "onnx-embedder")
    retriever = Retriever(tmp_path, MODEL, backend="onnx", threads=3)
    made = _with_torch(retriever, monkeypatch)
    assert retriever._load_query_embedder() == "onnx-embedder"
    assert asked == [((MODEL, "onnx"), {"threads": 3})] and made == []


def test_the_torch_backend_never_tries_a_fast_one_and_loads_torch_once(tmp_path, monkeypatch):
    monkeypatch.setattr(fast_embedder, "load_query_embedder", lambda *a, **k: pytest.fail("not for torch"))
    retriever = Retriever(tmp_path, MODEL, backend="torch")
    made = _with_torch(retriever, monkeypatch)
    first = retriever._load_query_embedder()
    assert first is made[0] and retriever._load_query_embedder() is first and len(made) == 1


def test_an_unavailable_backend_falls_back_to_torch_with_a_warning(tmp_path, monkeypatch, caplog):
    def unavailable(*_args, **_kwargs):
        raise ImportError("no onnxruntime")

    monkeypatch.setattr(fast_embedder, "load_query_embedder", unavailable)
    retriever = Retriever(tmp_path, MODEL, backend="onnx")
    made = _with_torch(retriever, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="proxy.retriever"):
        assert retriever._load_query_embedder() is made[0]
    assert caplog.messages == ["embedding backend onnx unavailable (no onnxruntime); queries use torch"]


def test_the_query_embedder_batches_and_caches_as_configured_and_stops_with_the_retriever(tmp_path, monkeypatch):
    retriever = Retriever(tmp_path, MODEL, max_batch=7, cache_size=11)
    monkeypatch.setattr(retriever, "_load_query_embedder", lambda: SimpleNamespace(dim=4))

    async def lifecycle():
        batching = await retriever._embedder()
        assert (batching.max_batch, batching.cache_size, batching.running) == (7, 11, True)
        assert await retriever._embedder() is batching  # loaded once
        await retriever.stop()
        assert not batching.running  # inside the loop: asyncio.run would cancel a forgotten worker anyway

    asyncio.run(lifecycle())


def test_the_loop_reloads_only_when_the_current_version_changed(tmp_path, monkeypatch):
    retriever = Retriever(tmp_path, MODEL)
    retriever._batching = object()  # no embedder is loaded
    current, loads = {"version": None}, []

    def load():
        loads.append(current["version"])
        time.sleep(0.02)  # so the load time has a floor
        return _index(current["version"])

    monkeypatch.setattr(retriever.store, "current_version", lambda: current["version"])
    monkeypatch.setattr(retriever.store, "load", load)

    async def loop_ticks():
        await retriever.maybe_reload()  # no index yet: nothing to load
        current["version"] = "v1"
        await retriever.maybe_reload()
        await retriever.maybe_reload()  # the same version: not read again
        current["version"] = "v2"
        await retriever.maybe_reload()

    asyncio.run(loop_ticks())
    assert loads == ["v1", "v2"] and retriever.version == "v2"
    assert 0.02 <= retriever.load_seconds < 30  # a duration, not a clock reading


@pytest.mark.parametrize(("title", "metadata", "expected_title", "expected_by_source"), [
    ("Walrus facts", None, "Walrus facts", None),
    ("", None, "https://docs.example/walrus", None),  # no <title>: the page's address names it
    ("Walrus facts", DocumentMetadata(title="The walrus operator", tags=("python",), category="syntax"),
     "Walrus facts", "with"),
])
def test_an_ingested_page_is_one_document_named_and_labelled(tmp_path, monkeypatch, title, metadata, expected_title,
                                                            expected_by_source):
    embedded, added = [], []
    retriever = _retriever(tmp_path, monkeypatch, load=None, embed=lambda *args: embedded.append(args) or ([], None),
                           add=lambda *args: added.append(args) or _index("v1", 2))
    page = FetchedPage(url="https://docs.example/w", final_url="https://docs.example/walrus",
                       content_type="text/html", title=title, text="The walrus operator := assigns.")
    asyncio.run(retriever.add_page(page, metadata))
    ((documents, embedder, by_source),) = embedded
    (document,) = documents
    assert (document.title, document.source, document.text) == (
        expected_title, "https://docs.example/walrus", "The walrus operator := assigns.")
    assert embedder is retriever._plain
    # The embedder's width: what an empty index is made with when this page is the index dir's first.
    assert [(store, dim) for _chunks, _embeddings, store, dim in added] == [(retriever.store, 4)]
    assert by_source == ({"https://docs.example/walrus": metadata} if expected_by_source else None)


def test_a_reload_begun_before_an_ingest_does_not_put_the_older_index_back(tmp_path, monkeypatch):
    """`/admin/process_url` adds a page while the background loop reloads the index it read before: the page stays."""
    load_started, release_load = threading.Event(), threading.Event()
    old, new = _index("v1", 3), _index("v2", 5)

    def load():
        load_started.set()
        release_load.wait(10)
        return old

    retriever = _retriever(tmp_path, monkeypatch, load=load, embed=lambda *_args: ([], None),
                           add=lambda *_args: new)

    async def interleave():
        background = asyncio.create_task(retriever.reload())
        await asyncio.to_thread(load_started.wait, 10)
        ingest = asyncio.create_task(retriever.add_page(PAGE))
        await asyncio.wait([ingest], timeout=0.5)
        release_load.set()
        await background
        return await ingest

    index, added = asyncio.run(interleave())
    assert retriever.index is new and index is new
    assert added == 2  # counted against the index it was added to, not one read before


def test_a_reload_does_not_wait_for_an_ingests_embedding(tmp_path, monkeypatch):
    """Embedding a long page takes seconds; the refresh loop's reload (and the experiment refresh after it) goes on."""
    embedding_started, release_embedding = threading.Event(), threading.Event()
    current = _Index(version="v1", n=3)

    def embed(*_args):
        embedding_started.set()
        release_embedding.wait(10)
        return [], None

    retriever = _retriever(tmp_path, monkeypatch, load=lambda: current, embed=embed,
                           add=lambda *_args: _Index(version="v2", n=4))

    async def interleave():
        ingest = asyncio.create_task(retriever.add_page(PAGE))
        await asyncio.to_thread(embedding_started.wait, 10)
        try:
            async with asyncio.timeout(5):
                return await retriever.reload()
        finally:
            release_embedding.set()
            await ingest

    assert asyncio.run(interleave()) is current
    assert retriever.index.version == "v2"  # the ingest then installed its own
