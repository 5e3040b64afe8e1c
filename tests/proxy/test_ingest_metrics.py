"""process_url with LLM metadata through a real proxy: metadata in the index and in search items, a
failed extraction that still ingests, and the ingestion / index series in /metrics."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
from fastapi import FastAPI, Request
from prometheus_client.parser import text_string_to_metric_families

from retrieval.corpus import Document
from retrieval.index import IndexStore
from serving.stub import running_stub
from tests.conftest import serve_app
from tests.proxy.conftest import dead_url, fake_web, make_settings, running_proxy

LABELS = {"title": "Python's walrus operator", "tags": ["python", "assignment expressions"], "category": "programming"}
DOCUMENTS = [
    Document("Lists", "doc:lists", "A list is a mutable sequence. Use append to add an item to the end of a list."),
    Document("Files", "doc:files", "Open a file with open(path). Always close files, or use a with statement."),
]
PAGE = """<html><head><title>Walrus facts</title></head><body><article>
<h1>Walrus facts</h1><p>The assignment expression operator := is nicknamed the walrus operator.
It assigns a value to a name inside a larger expression, such as a while loop condition.</p></article></body></html>"""


def _transport(status: int = 200, text: str = PAGE) -> httpx.MockTransport:
    return httpx.MockTransport(
        lambda request: httpx.Response(status, text=text, headers={"content-type": "text/html; charset=utf-8"})
    )



def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture(scope="module")
def index_documents():
    return DOCUMENTS


@pytest.fixture(scope="module")
def labeller():
    with running_stub(model="labeller", answer="Here you go:\n" + json.dumps(LABELS)) as (stub, url):
        yield stub, url


@pytest.mark.slow
def test_metadata_reaches_the_index_search_items_and_metrics(tmp_path, index_dir, client, admin_headers,
                                                            control_upstream, labeller):
    settings = make_settings(tmp_path, llm_api_base=control_upstream[1], index_dir=index_dir,
                             metadata_api_base=labeller[1], metadata_model="labeller")
    with running_proxy(settings, dependency_overrides=fake_web(_transport())) as (url, _app):
        before = _samples(client.get(f"{url}/metrics").text)
        ingested = client.post(f"{url}/api/v1/process_url", json={"url": "https://docs.example/walrus"},
                               headers=admin_headers)
        assert ingested.status_code == 200, ingested.text
        found = client.post(f"{url}/api/v1/search", json={"query": "what is the walrus operator?", "top_k": 3}).json()
        after = _samples(client.get(f"{url}/metrics").text)

    result = ingested.json()
    assert result["metadata"] == "extracted" and result["title"] == LABELS["title"]
    assert result["tags"] == LABELS["tags"] and result["category"] == "programming"
    top, *others = found["items"]
    assert {"id", "title", "source", "score", "text"} <= set(top)
    assert top["source"] == "https://docs.example/walrus" and top["title"] == LABELS["title"]
    assert top["tags"] == LABELS["tags"] and top["category"] == "programming"
    assert all(item["tags"] == [] and item["category"] is None for item in others)  # built without metadata

    assert before[("abloop_index_chunks", ())] == len(DOCUMENTS)
    assert before[("abloop_index_load_seconds", ())] > 0
    old_version = IndexStore(index_dir).versions()[0]
    assert before[("abloop_index_info", (("version", old_version),))] == 1
    assert after[("abloop_index_chunks", ())] == len(DOCUMENTS) + result["chunks_added"]
    assert after[("abloop_index_info", (("version", result["index_version"]),))] == 1
    assert ("abloop_index_info", (("version", old_version),)) not in after
    assert after[("abloop_process_url_total", (("outcome", "ok"),))] == 1
    assert after[("abloop_process_url_seconds_count", ())] == 1
    assert after[("abloop_metadata_extraction_total", (("outcome", "ok"),))] == 1
    assert after[("abloop_metadata_extraction_total", (("outcome", "invalid"),))] == 0


def _recording_labeller(asked: list[tuple[str | None, dict]], delays_s: list[float]) -> FastAPI:
    """A chat-completions endpoint that answers LABELS after the next of `delays_s`, keeping what it was asked."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> dict:
        asked.append((request.headers.get("authorization"), await request.json()))
        await asyncio.sleep(delays_s.pop(0))
        return {"choices": [{"message": {"role": "assistant", "content": json.dumps(LABELS)}}]}

    return app


@pytest.mark.slow
def test_metadata_is_asked_with_the_configured_model_key_and_timeout_about_this_page(
        tmp_path, index_dir, client, admin_headers, control_upstream, caplog):
    caplog.set_level(logging.INFO, logger="abloop.proxy")
    asked: list[tuple[str | None, dict]] = []
    with serve_app(_recording_labeller(asked, delays_s=[0.0, 5.0])) as labeller:
        settings = make_settings(tmp_path, llm_api_base=control_upstream[1], index_dir=index_dir,
                                 metadata_api_base=f"{labeller}/v1", metadata_model="labeller-1",
                                 llm_api_key="sk-metadata-test", llm_timeout_s=0.5)
        with running_proxy(settings, dependency_overrides=fake_web(_transport())) as (url, _):
            results = [client.post(f"{url}/api/v1/process_url", json={"url": f"https://docs.example/walrus-{n}"},
                                   headers=admin_headers).json() for n in (1, 2)]

    (authorization, body), _ = asked
    assert authorization == "Bearer sk-metadata-test" and body["model"] == "labeller-1"
    prompt = body["messages"][-1]["content"]
    assert "Source: https://docs.example/walrus-1\n" in prompt and "Title: Walrus facts\n" in prompt
    assert "nicknamed the walrus operator" in prompt
    # The second answer comes after LLM_TIMEOUT_S: the page is indexed without metadata, and the log says why.
    assert [r["metadata"] for r in results] == ["extracted", "failed"] and results[1]["title"] == "Walrus facts"
    lines = [record.getMessage() for record in caplog.records if record.name == "abloop.proxy"]
    assert [line for line in lines if line.startswith("no metadata for ")] == [
        "no metadata for https://docs.example/walrus-2 (error), indexed without it: request to "
        f"{labeller}/v1/chat/completions failed: ReadTimeout: timed out"]
    assert [line for line in lines if line.startswith("ingested ")] == [
        f"ingested {r['chunks_added']} chunks into index {r['index_version']}" for r in results]


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["bad answer", "down"])
def test_a_failed_extraction_still_ingests_the_page(tmp_path, index_dir, client, admin_headers, control_upstream,
                                                   endpoint):
    outcome = {"bad answer": "invalid", "down": "error"}[endpoint]
    with running_stub(answer="Sorry, I can't help with labelling.") as (_stub, garbage_url):
        metadata_api_base = garbage_url if endpoint == "bad answer" else dead_url()
        settings = make_settings(tmp_path, llm_api_base=control_upstream[1], index_dir=index_dir,
                                 metadata_api_base=metadata_api_base)
        with running_proxy(settings, dependency_overrides=fake_web(_transport())) as (url, _):
            ingested = client.post(f"{url}/api/v1/process_url", json={"url": "https://docs.example/walrus"},
                                   headers=admin_headers)
            top = client.post(f"{url}/api/v1/search", json={"query": "walrus operator"}).json()["items"][0]
            after = _samples(client.get(f"{url}/metrics").text)

    assert ingested.status_code == 200, ingested.text
    result = ingested.json()
    assert result["metadata"] == "failed" and result["chunks_added"] >= 1 and result["title"] == "Walrus facts"
    assert result["tags"] == [] and result["category"] is None
    assert top["source"] == "https://docs.example/walrus" and top["tags"] == [] and top["category"] is None
    assert after[("abloop_metadata_extraction_total", (("outcome", outcome),))] == 1
    assert after[("abloop_metadata_extraction_total", (("outcome", "ok"),))] == 0
    assert after[("abloop_process_url_total", (("outcome", "ok"),))] == 1


def test_refusals_are_counted_by_outcome_and_never_ask_for_metadata(tmp_path, client, admin_headers,
                                                                    control_upstream, labeller):
    stub, labeller_url = labeller
    asked_before = stub.requests

    def pages(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/down":
            return httpx.Response(500, text="down")
        return httpx.Response(200, text="<html><body></body></html>", headers={"content-type": "text/html"})

    settings = make_settings(tmp_path, llm_api_base=control_upstream[1], metadata_api_base=labeller_url)
    targets = {"http://127.0.0.1/": 400, "https://docs.example/down": 502, "https://docs.example/empty": 422}
    web = fake_web(httpx.MockTransport(pages))
    with running_proxy(settings, dependency_overrides=web) as (url, _):
        codes = {target: client.post(f"{url}/api/v1/process_url", json={"url": target},
                                     headers=admin_headers).status_code for target in targets}
        samples = _samples(client.get(f"{url}/metrics").text)

    assert codes == targets
    for outcome, count in {"refused": 1, "fetch_error": 1, "empty": 1, "ok": 0, "error": 0}.items():
        assert samples[("abloop_process_url_total", (("outcome", outcome),))] == count, outcome
    assert samples[("abloop_process_url_seconds_count", ())] == 3
    assert samples[("abloop_index_chunks", ())] == 0
    assert not any(name == "abloop_index_info" for name, _labels in samples)  # no index yet
    assert stub.requests == asked_before
