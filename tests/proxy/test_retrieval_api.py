"""Real embeddings and a real FAISS index behind the proxy: search, ingestion, hot reload, readiness."""

from __future__ import annotations

import time

import httpx
import pytest

from retrieval.corpus import Document
from retrieval.index import IndexStore
from tests.proxy.conftest import fake_web, make_settings, running_proxy

pytestmark = pytest.mark.slow

DOCUMENTS = [
    Document("Lists", "doc:lists", "A list is a mutable sequence. Use append to add an item to the end of a list."),
    Document("Dictionaries", "doc:dicts", "A dict maps keys to values. Keys must be hashable, like strings."),
    Document("Files", "doc:files", "Open a file with open(path). Always close files, or use a with statement."),
]
PAGE = """<html><head><title>Walrus facts</title></head><body><article>
<h1>Walrus facts</h1><p>The assignment expression operator := is nicknamed the walrus operator.
It assigns a value to a name inside a larger expression, such as a while loop condition.</p>
<p>It was added to Python in version 3.8 by PEP 572.</p></article></body></html>"""


@pytest.fixture(scope="module")
def index_documents():
    return DOCUMENTS


def _public_page_transport() -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["host"] == "docs.example"
        return httpx.Response(200, text=PAGE, headers={"content-type": "text/html; charset=utf-8"})

    return httpx.MockTransport(handler)



def test_search_returns_the_relevant_passage(tmp_path, index_dir, client, control_upstream):
    settings = make_settings(tmp_path, llm_api_base=control_upstream[1], index_dir=index_dir)
    with running_proxy(settings) as (url, app):
        body = client.post(f"{url}/api/v1/search", json={"query": "how do I add an item to a list?", "top_k": 2}).json()
        ready = client.get(f"{url}/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"index": True, "store": True}
    assert len(body["items"]) == 2
    top = body["items"][0]
    assert top["title"] == "Lists" and top["source"] == "doc:lists" and "append" in top["text"]
    assert body["items"][0]["score"] >= body["items"][1]["score"]
    assert body["timings_ms"]["retrieval"] > 0


def test_readyz_is_503_without_an_index(tmp_path, client, control_upstream):
    with running_proxy(make_settings(tmp_path, llm_api_base=control_upstream[1])) as (url, _app):
        response = client.get(f"{url}/readyz")
        assert client.get(f"{url}/healthz").status_code == 200
    assert response.status_code == 503 and response.json()["checks"]["index"] is False


def test_ingested_page_is_searchable_on_every_replica(tmp_path, index_dir, client, admin_headers, control_upstream):
    common = {"llm_api_base": control_upstream[1], "index_dir": index_dir,
              "database_url": f"sqlite:///{tmp_path / 'shared.db'}"}
    replica_a = make_settings(tmp_path / "a", **common)
    replica_b = make_settings(tmp_path / "b", **common)
    with (
        running_proxy(replica_a, dependency_overrides=fake_web(_public_page_transport())) as (a, _),
        running_proxy(replica_b) as (b, app_b),
    ):
        before = app_b.state.abloop.retriever.version
        ingested = client.post(f"{a}/api/v1/process_url", json={"url": "https://docs.example/walrus"},
                               headers=admin_headers)
        assert ingested.status_code == 200, ingested.text
        result = ingested.json()
        assert result["chunks_added"] >= 1 and result["title"] == "Walrus facts"
        assert result["metadata"] == "off" and result["tags"] == [] and result["category"] is None  # no METADATA_*
        assert result["index_version"] != before
        hit = client.post(f"{a}/api/v1/search", json={"query": "what is the walrus operator?"}).json()["items"][0]
        assert hit["source"] == "https://docs.example/walrus"
        # Replica B picks the new version up on its own, at its next refresh; waited for by state, with
        # a deadline far beyond the refresh interval so that a loaded machine does not fail it.
        deadline = time.monotonic() + 120
        while app_b.state.abloop.retriever.version != result["index_version"]:
            assert time.monotonic() < deadline, "replica B never reloaded the index"
            time.sleep(0.1)
        hit_b = client.post(f"{b}/api/v1/search", json={"query": "what is the walrus operator?"}).json()["items"][0]
        reloaded = client.post(f"{b}/api/v1/admin/reload-index", headers=admin_headers).json()
    assert hit_b["source"] == "https://docs.example/walrus"
    assert reloaded["index_version"] == result["index_version"] and reloaded["chunks"] > len(DOCUMENTS)
    assert len(IndexStore(index_dir).versions()) == 2


def test_metrics_expose_per_arm_series(tmp_path, index_dir, client, control_upstream):
    settings = make_settings(tmp_path, llm_api_base=control_upstream[1], index_dir=index_dir)
    with running_proxy(settings) as (url, _app):
        searched = client.post(f"{url}/api/v1/search", json={"query": "dict keys", "user_id": "u"})
        request_id = searched.json()["request_id"]
        client.post(f"{url}/api/v1/feedback", json={"request_id": request_id, "thumbs": "down"})
        text = client.get(f"{url}/metrics").text
    for series in (
        'abloop_search_requests_total{arm="control",served_arm="control",status="ok"} 1.0',
        'abloop_search_latency_seconds_count{arm="control"} 1.0',
        'abloop_llm_latency_seconds_count{served_arm="control"} 1.0',
        'abloop_tokens_total{arm="control",direction="out"} 5.0',
        'abloop_feedback_total{kind="thumbs_down"} 1.0',
        "abloop_writer_queue_depth",
        "abloop_writer_spool_bytes",
        "abloop_retrieval_latency_seconds_count 1.0",
    ):
        assert series in text, series
