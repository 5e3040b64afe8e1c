"""The ingest flow as a real Prefect run (temporary local server) with real embeddings and FAISS."""

from __future__ import annotations

import json

import pytest

from retrieval.index import IndexStore
from serving.stub import running_stub
from tests.conftest import UNDER_TEST_EMBEDDER

pytestmark = pytest.mark.slow


def test_ingest_flow_builds_a_new_index_version(tmp_path, monkeypatch, embedder_asked):
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
    assert embedder_asked == [UNDER_TEST_EMBEDDER]


LABELS = {"title": "Python notes", "tags": ["python", "basics"], "category": "programming"}


def _corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "walrus.txt").write_text("The walrus operator := assigns inside an expression. Added in 3.8.")
    (corpus / "lists.md").write_text("# Lists\n\nA list is a mutable sequence; append adds an item.")
    return corpus


def test_ingest_flow_stores_llm_metadata_with_every_chunk(tmp_path, monkeypatch):
    from flows.ingest import ingest

    with running_stub(model="labeller", answer=json.dumps(LABELS)) as (stub, url):
        monkeypatch.setenv("INDEX_DIR", str(tmp_path / "index"))
        monkeypatch.setenv("METADATA_API_BASE", url)
        monkeypatch.setenv("METADATA_MODEL", "labeller")
        monkeypatch.setenv("LLM_API_KEY", "sk-labeller")
        built = ingest(corpus=str(_corpus(tmp_path)))
    assert [(r.authorization, r.json()["model"]) for r in stub.recent] == [("Bearer sk-labeller", "labeller")] * 2
    assert built["metadata"] == {"ok": 2, "invalid": 0, "error": 0}
    chunks = IndexStore(tmp_path / "index").load().chunks
    assert {c.source for c in chunks} == {"walrus.txt", "lists.md"}
    assert all((c.title, c.tags, c.category) == ("Python notes", ("python", "basics"), "programming") for c in chunks)


@pytest.mark.parametrize("endpoint", ["bad answer", "failing", "slower than LLM_TIMEOUT_S"])
def test_ingest_flow_indexes_every_document_when_metadata_fails(tmp_path, monkeypatch, endpoint):
    from flows.ingest import ingest

    stub_options = {"bad answer": {"answer": "I'd rather not."}, "failing": {"status": 500},
                    "slower than LLM_TIMEOUT_S": {"answer": json.dumps(LABELS), "delay_s": 2.0}}[endpoint]
    with running_stub(**stub_options) as (_stub, url):
        monkeypatch.setenv("INDEX_DIR", str(tmp_path / "index"))
        monkeypatch.setenv("METADATA_API_BASE", url)
        monkeypatch.setenv("LLM_TIMEOUT_S", "0.3")
        state = ingest(corpus=str(_corpus(tmp_path)), return_state=True)
    assert state.is_completed()
    built = state.result()
    outcome = {"bad answer": "invalid", "failing": "error", "slower than LLM_TIMEOUT_S": "error"}[endpoint]
    assert built["metadata"] == {"ok": 0, "invalid": 0, "error": 0, outcome: 2}
    chunks = IndexStore(tmp_path / "index").load().chunks
    assert built["documents"] == 2 and {c.source for c in chunks} == {"walrus.txt", "lists.md"}
    assert all(c.tags == () and c.category is None for c in chunks)
    assert {c.title for c in chunks} == {"The walrus operator := assigns inside an expression. Added in 3.8.", "Lists"}
