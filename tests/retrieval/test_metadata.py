"""LLM metadata for documents: parsing and validation, failures that never lose a document, persistence."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from retrieval.build import add_documents, build_index, chunk_documents
from retrieval.corpus import Document
from retrieval.index import Chunk, IndexStore, VectorIndex
from retrieval.metadata import DocumentMetadata, MetadataError, MetadataExtractor
from serving.stub import running_stub

API_KEY = "sk-metadata-secret"
GOOD = {"title": "The walrus operator", "tags": ["Python", "syntax", "python", " "], "category": "programming"}
DOCUMENTS = [
    Document("walrus", "doc:walrus", "The assignment expression := assigns inside an expression."),
    Document("lists", "doc:lists", "A list is a mutable sequence; append adds an item to its end."),
]


def _chat(content: object) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def _answering(content: str):
    """A mock endpoint's handler answering every call with `content`, and the requests it has seen."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=_chat(content))

    return seen, handler


def _extractor(handler, **kwargs) -> MetadataExtractor:
    return MetadataExtractor("http://llm.example/v1/", "labeller", API_KEY, transport=httpx.MockTransport(handler),
                             **kwargs)


def test_extract_sends_one_chat_call_and_validates_the_answer() -> None:
    seen, handler = _answering("Sure! ```json\n" + json.dumps(GOOD) + "\n```")

    with _extractor(handler) as extractor:
        metadata = extractor.extract("walrus", "x" * 10_000, "doc:walrus")
    assert metadata == DocumentMetadata(title="The walrus operator", tags=("python", "syntax"), category="programming")
    (request,) = seen
    assert str(request.url) == "http://llm.example/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    body = json.loads(request.content)
    assert body["model"] == "labeller" and body["temperature"] == 0
    prompt = body["messages"][-1]["content"]
    assert "doc:walrus" in prompt and "x" * 4000 in prompt and "x" * 4001 not in prompt
    assert API_KEY not in repr(extractor)


def test_tags_are_capped_and_blank_category_is_none() -> None:
    metadata = DocumentMetadata.model_validate(
        {"title": "t", "tags": [f"tag{i}" for i in range(12)] + ["a sentence " * 10], "category": "  ", "extra": 1}
    )
    assert metadata.tags == tuple(f"tag{i}" for i in range(8)) and metadata.category is None


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ("I cannot label this document.", "no JSON object"),
        ('{"title": "t", "tags": ["a"', "no JSON object"),
        ('{"tags": ["a"], "category": "c"}', "title"),
        ('{"title": "", "tags": []}', "title"),
        ('{"title": "t", "tags": "a, b"}', "tags"),
        ('{"title": "t", "tags": [1, 2]}', "tags"),
        ('{"title": "' + "t" * 201 + '"}', "title"),
        ("{not json at all}", "unusable"),
    ],
)
def test_bad_answers_are_invalid(answer: str, problem: str) -> None:
    reply = httpx.Response(200, json=_chat(answer))
    with _extractor(lambda request: reply) as extractor, pytest.raises(MetadataError, match=problem) as raised:
        extractor.extract("t", "text")
    assert raised.value.outcome == "invalid"


@pytest.mark.parametrize(
    ("response", "outcome"),
    [
        (httpx.Response(500, text="overloaded"), "error"),
        (httpx.Response(401, json={"error": "bad key"}), "error"),
        (httpx.Response(200, json={"unexpected": True}), "invalid"),
        (httpx.Response(200, json=_chat(None)), "invalid"),
    ],
)
def test_failed_calls_say_why_without_the_key(response: httpx.Response, outcome: str) -> None:
    with _extractor(lambda request: response) as extractor, pytest.raises(MetadataError) as raised:
        extractor.extract("t", "text")
    assert raised.value.outcome == outcome and API_KEY not in str(raised.value)


def test_extract_all_keeps_going_and_gives_up_on_a_dead_endpoint() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["messages"][-1]["content"]
        calls.append(prompt)
        if "doc:bad" in prompt:
            return httpx.Response(200, json=_chat("no idea"))
        if "doc:down" in prompt:
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, json=_chat(json.dumps(GOOD)))

    mixed = [Document("good", "doc:good", "g"), Document("bad", "doc:bad", "b"), DOCUMENTS[0]]
    with _extractor(handler) as extractor:
        extraction = extractor.extract_all(mixed, max_workers=2)
    assert set(extraction.metadata) == {"doc:good", "doc:walrus"}
    assert set(extraction.failures) == {"doc:bad"} and extraction.failures["doc:bad"].outcome == "invalid"
    assert extraction.counts() == {"ok": 2, "invalid": 1, "error": 0}

    calls.clear()
    down = [Document(f"d{i}", f"doc:down{i}", "text") for i in range(12)]
    with _extractor(handler) as extractor:
        extraction = extractor.extract_all(down, max_workers=1)
    assert extraction.counts() == {"ok": 0, "invalid": 0, "error": 12}
    assert len(calls) == 5  # then the endpoint counts as down; the rest are skipped, not timed out one by one
    assert "skipped" in str(extraction.failures["doc:down11"])


def test_extraction_through_a_real_http_server() -> None:
    with (
        running_stub(model="labeller", answer=json.dumps(GOOD)) as (stub, url),
        MetadataExtractor(url, "labeller", timeout_s=5) as extractor,
    ):
        extraction = extractor.extract_all(DOCUMENTS)
    assert stub.requests == 2
    assert extraction.counts()["ok"] == 2
    assert extraction.metadata["doc:lists"].tags == ("python", "syntax")


def test_metadata_rides_with_the_chunks_through_save_and_load(tmp_path: Path, hash_embedder) -> None:
    store = IndexStore(tmp_path)
    metadata = {"doc:walrus": DocumentMetadata.model_validate(GOOD)}
    built = build_index(DOCUMENTS, hash_embedder, store, metadata=metadata)
    loaded = store.load()
    walrus = next(c for c in loaded.chunks if c.source == "doc:walrus")
    lists = next(c for c in loaded.chunks if c.source == "doc:lists")
    assert (walrus.title, walrus.tags, walrus.category) == ("The walrus operator", ("python", "syntax"), "programming")
    assert (lists.title, lists.tags, lists.category) == ("lists", (), None)
    assert loaded.chunks == built.chunks
    query = hash_embedder.encode([f"{walrus.title}: {walrus.text}"])[0]
    hit = loaded.search(query, top_k=1)[0]
    assert (hit.source, hit.tags, hit.category) == ("doc:walrus", ("python", "syntax"), "programming")

    added = add_documents([Document("new", "doc:new", "brand new text")], hash_embedder, store,
                          metadata={"doc:new": DocumentMetadata(title="New", tags=("fresh",))})
    assert next(c for c in store.load(added.version).chunks if c.source == "doc:new").tags == ("fresh",)


def test_a_version_written_before_metadata_still_loads(tmp_path: Path) -> None:
    """Format 1 chunk lines have no tags or category keys."""
    store = IndexStore(tmp_path)
    vectors = np.eye(2, 4, dtype=np.float32)
    index = VectorIndex.build([Chunk("a", "A", "s:a", "alpha"), Chunk("b", "B", "s:b", "beta")], vectors)
    store.save(index)
    directory = tmp_path / index.version
    old_lines = [{"id": c.id, "title": c.title, "source": c.source, "text": c.text} for c in index.chunks]
    (directory / "chunks.jsonl").write_text("".join(json.dumps(line) + "\n" for line in old_lines))
    meta = json.loads((directory / "meta.json").read_text())
    (directory / "meta.json").write_text(json.dumps({**meta, "format": 1}))

    loaded = store.load()
    assert [(c.id, c.tags, c.category) for c in loaded.chunks] == [("a", (), None), ("b", (), None)]
    hit = loaded.search(vectors[1], top_k=1)[0]
    assert hit.id == "b" and hit.tags == () and hit.category is None


def test_chunks_without_metadata_keep_their_document_title() -> None:
    chunks = chunk_documents(DOCUMENTS, metadata={"doc:other": DocumentMetadata(title="Other")})
    assert [(c.title, c.tags, c.category) for c in chunks] == [("walrus", (), None), ("lists", (), None)]


def test_the_request_is_exactly_one_system_and_one_user_message_and_no_key_means_no_header() -> None:
    from retrieval.metadata import _SYSTEM

    seen, handler = _answering(json.dumps(GOOD))

    with MetadataExtractor("http://llm.example/v1", "labeller", transport=httpx.MockTransport(handler)) as extractor:
        extractor.extract("The title", "Body text.", "doc:x")
    (request,) = seen
    assert "authorization" not in request.headers
    assert json.loads(request.content) == {
        "model": "labeller",
        "messages": [
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": "Source: doc:x\nTitle: The title\n\nDocument:\nBody text.\n\nJSON:"},
        ],
        "temperature": 0,
        "max_tokens": 200,
    }
    with MetadataExtractor("http://llm.example/v1", "labeller", timeout_s=7) as extractor:
        assert extractor._client.timeout == httpx.Timeout(7)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (httpx.Response(400, text="bad request"),
         "http://llm.example/v1/chat/completions answered HTTP 400: 'bad request'"),
        (httpx.Response(200, text="<html>"),
         "http://llm.example/v1/chat/completions sent no chat completion: '<html>'"),
        (httpx.Response(200, json=_chat(123)), "http://llm.example/v1/chat/completions sent no text content: '123'"),
    ],
)  # fmt: skip
def test_failure_messages_name_the_endpoint_and_what_came_back(reply: httpx.Response, message: str) -> None:
    with _extractor(lambda request: reply) as extractor, pytest.raises(MetadataError) as raised:
        extractor.extract("t", "text")
    assert str(raised.value) == message


def test_a_transport_failure_says_which_and_why() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with _extractor(handler) as extractor, pytest.raises(MetadataError) as raised:
        extractor.extract("t", "text")
    assert str(raised.value) == (
        "request to http://llm.example/v1/chat/completions failed: ConnectError: connection refused"
    )


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ('{"title": "", "tags": [1, 2, 3]}',
         "unusable metadata (title: String should have at least 1 character; tags.0: Input should be a valid "
         "string; tags.1: Input should be a valid string): '{\"title\": \"\", \"tags\": [1, 2, 3]}'"),
        ("{not json at all}",
         "unusable metadata (answer: Invalid JSON: key must be a string at line 1 column 2): '{not json at all}'"),
    ],
)  # fmt: skip
def test_an_unusable_answer_lists_its_first_three_problems_by_field(answer: str, message: str) -> None:
    reply = httpx.Response(200, json=_chat(answer))
    with _extractor(lambda request: reply) as extractor, pytest.raises(MetadataError) as raised:
        extractor.extract("t", "text")
    assert str(raised.value) == message


def test_the_json_object_is_the_outermost_braces_and_nothing_after_them() -> None:
    nested = 'Here: {"title": "t", "source": {"kind": "web"}, "tags": ["a"]}.'
    with _extractor(lambda request: httpx.Response(200, json=_chat(nested))) as extractor:
        assert extractor.extract("t", "text") == DocumentMetadata(title="t", tags=("a",))


def test_only_failed_calls_in_a_row_count_towards_giving_up() -> None:
    # Four failures, then an answer (good or unusable) resets the count: no run of five, nothing skipped.
    plan = ["down"] * 4 + ["good"] + ["down"] * 4 + ["bad"] + ["down"] * 4 + ["good"]
    prompts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["messages"][-1]["content"]
        prompts.append(prompt)
        kind = plan[int(prompt.split("Title: d", 1)[1].split("\n", 1)[0])]
        if kind == "down":
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, json=_chat(json.dumps(GOOD) if kind == "good" else "no idea"))

    documents = [Document(f"d{i}", f"doc:{i}", "text") for i in range(len(plan))]
    with _extractor(handler) as extractor:
        extraction = extractor.extract_all(documents, max_workers=1)
    assert extraction.counts() == {"ok": 2, "invalid": 1, "error": 12}
    assert not any("skipped" in str(failure) for failure in extraction.failures.values())
    assert prompts[7] == "Source: doc:7\nTitle: d7\n\nDocument:\ntext\n\nJSON:"  # each document's own fields


def test_extract_all_keeps_at_most_max_workers_calls_in_flight_on_named_threads() -> None:
    import threading
    import time

    lock, in_flight, most, names = threading.Lock(), [0], [0], set()

    def handler(request: httpx.Request) -> httpx.Response:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            names.add(threading.current_thread().name.rsplit("_", 1)[0])
        time.sleep(0.05)
        with lock:
            in_flight[0] -= 1
        return httpx.Response(200, json=_chat(json.dumps(GOOD)))

    documents = [Document(f"d{i}", f"doc:{i}", "text") for i in range(8)]
    with _extractor(handler) as extractor:
        assert extractor.extract_all(documents, max_workers=2).counts()["ok"] == 8
    assert most[0] == 2 and names == {"metadata"}


def test_extract_documents_labels_a_corpus_through_one_endpoint_and_failures_survive_pickling() -> None:
    import pickle

    from retrieval.metadata import extract_documents

    with running_stub(model="labeller", answer=json.dumps(GOOD)) as (stub, url):
        extraction = extract_documents(DOCUMENTS, url, "labeller", timeout_s=5)
    assert stub.requests == 2 and extraction.counts() == {"ok": 2, "invalid": 0, "error": 0}
    failure = pickle.loads(pickle.dumps(MetadataError("invalid", "no JSON object")))
    assert failure.outcome == "invalid" and str(failure) == "no JSON object"


def test_extract_documents_calls_with_its_model_key_and_timeout(monkeypatch) -> None:
    import retrieval.metadata as metadata_module

    seen, handler = _answering(json.dumps(GOOD))
    made: list[MetadataExtractor] = []

    class Mocked(MetadataExtractor):  # the real extractor over a mock transport
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs, transport=httpx.MockTransport(handler))
            made.append(self)

    monkeypatch.setattr(metadata_module, "MetadataExtractor", Mocked)
    extraction = metadata_module.extract_documents(DOCUMENTS[:1], "http://llm.example/v1", "labeller", API_KEY, 7)
    assert extraction.counts()["ok"] == 1
    (request,) = seen
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert json.loads(request.content)["model"] == "labeller"
    assert made[0]._client.timeout == httpx.Timeout(7)
