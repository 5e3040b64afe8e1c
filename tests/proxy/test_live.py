"""A replica's view of the running experiment: a refresh never puts an older split back."""

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


