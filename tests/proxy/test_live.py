"""A replica's view of the store (the running experiment, the index): a refresh never puts an older one back."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from proxy import live as live_module
from proxy.live import Live


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


def test_a_reload_begun_before_an_ingest_does_not_put_the_older_index_back(tmp_path, monkeypatch):
    """`/admin/ingest` adds a page while the background loop reloads the index it read before: the page stays."""
    from proxy.retriever import Retriever
    from retrieval import build
    from retrieval.fetch import FetchedPage

    load_started, release_load = threading.Event(), threading.Event()
    class Index(SimpleNamespace):
        def __len__(self):
            return self.n

    old, new = Index(version="v1", n=3), Index(version="v2", n=5)

    def load():
        load_started.set()
        release_load.wait(10)
        return old

    retriever = Retriever(tmp_path, "unused")
    retriever._batching = retriever._plain = object()  # no embedder is loaded: neither side embeds here
    monkeypatch.setattr(retriever.store, "load", load)
    monkeypatch.setattr(build, "add_documents", lambda *_args: new)

    async def interleave():
        background = asyncio.create_task(retriever.reload())
        await asyncio.to_thread(load_started.wait, 10)
        page = FetchedPage(url="https://example.org/a", final_url="https://example.org/a", content_type="text/html",
                           title="A", text="a page")
        ingest = asyncio.create_task(retriever.add_page(page))
        await asyncio.wait([ingest], timeout=0.5)
        release_load.set()
        await background
        return await ingest

    index, added = asyncio.run(interleave())
    assert retriever.index is new and index is new
    assert added == 2  # counted against the index it was added to, not one read before
