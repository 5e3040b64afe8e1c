"""The ingest flow as a real Prefect run (temporary local server) with real embeddings and FAISS."""

from __future__ import annotations

import pytest

from retrieval.index import IndexStore

pytestmark = pytest.mark.slow


def test_ingest_flow_builds_a_new_index_version(tmp_path, monkeypatch):
    from flows.ingest import ingest

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "walrus.txt").write_text("The walrus operator := assigns inside an expression. Added in 3.8.")
    (corpus / "lists.md").write_text("# Lists\n\nA list is a mutable sequence; append adds an item.")
    monkeypatch.setenv("INDEX_DIR", str(tmp_path / "index"))

    state = ingest(corpus=str(corpus), return_state=True)
    assert state.is_completed()
    built = state.result()
    store = IndexStore(tmp_path / "index")
    assert built["index_version"] == store.current_version()
    assert built["documents"] == 2 and built["chunks"] == len(store.load()) >= 2
