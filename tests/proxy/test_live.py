"""A replica's view of the store (the running experiment, the index): a refresh never puts an older one back."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from proxy import live as live_module
from proxy.live import Live
from proxy.retriever import Retriever
from retrieval import build
from retrieval.fetch import FetchedPage


def test_a_read_begun_before_an_admin_change_does_not_overwrite_the_change(monkeypatch):
    """The background refresh reads the store while an admin PUT commits and refreshes; the PUT's split must stay.

    This interleaving left a replica serving the old share for a refresh interval in CI, which
    the ramp test then saw as a sample ratio mismatch (p = 0.0003).
    """
    store = {"share": 0.1}
    first_read_started, release_first_read = threading.Event(), threading.Event()
    reads = []

    def ensure_running(_db, _settings):
        seen = SimpleNamespace(candidate_share=store["share"], candidate_prompt_template_id=None)
        reads.append(seen.candidate_share)
        if len(reads) == 1:  # the background read: it saw the store before the change committed
            first_read_started.set()
            release_first_read.wait(10)
        return seen

    monkeypatch.setattr(live_module.experiments, "ensure_running", ensure_running)
    monkeypatch.setattr(live_module.prompts, "active", lambda _db: None)

    async def interleave() -> float:
        replica = Live(settings=None, db=None, retriever=None)
        background = asyncio.create_task(replica.refresh())
        await asyncio.to_thread(first_read_started.wait, 10)
        store["share"] = 0.5  # the admin change commits...
        admin = asyncio.create_task(replica.refresh())  # ...and its own refresh follows
        await asyncio.wait([admin], timeout=0.5)
        release_first_read.set()
        await asyncio.gather(background, admin)
        return replica.snapshot.experiment.candidate_share

    assert asyncio.run(interleave()) == 0.5
    assert reads == [0.1, 0.5]



class _Index(SimpleNamespace):
    """What the retriever holds, reduced to what these tests read."""

    def __len__(self):
        return self.n


PAGE = FetchedPage(url="https://example.org/a", final_url="https://example.org/a", content_type="text/html",
                   title="A", text="a page")


def _retriever(tmp_path, monkeypatch, *, load, embed, add) -> Retriever:
    """A retriever whose store reads, embedding and store writes are the given stand-ins (no model loads)."""
    retriever = Retriever(tmp_path, "unused")
    retriever._batching = object()
    retriever._plain = SimpleNamespace(dim=4)
    monkeypatch.setattr(retriever.store, "load", load)
    monkeypatch.setattr(build, "embed_documents", embed)
    monkeypatch.setattr(build, "add_embedded", add)
    return retriever


def test_a_reload_begun_before_an_ingest_does_not_put_the_older_index_back(tmp_path, monkeypatch):
    """`/admin/process_url` adds a page while the background loop reloads the index it read before: the page stays."""
    load_started, release_load = threading.Event(), threading.Event()
    old, new = _Index(version="v1", n=3), _Index(version="v2", n=5)

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
