import json
from collections import Counter
from functools import partial

import httpx
import pytest

from retrieval.index import Chunk, IndexStore, VectorIndex
from training.dataset import HOLDOUT_FILE, TRAIN_FILE, build_dataset, read_rows
from training.select import SelectionConfig
from training.synthetic import (
    PromptLayout,
    SyntheticConfig,
    count_retrievals,
    generate_synthetic,
    parse_pairs,
    rarely_retrieved,
)

GENERATORS = Chunk(
    id="c-gen",
    title="Generators",
    source="docs",
    text="A generator function uses the yield statement to produce a sequence of values lazily.",
)
SORTING = Chunk(id="c-sort", title="Sorting", source="docs", text="The sorted function returns a new sorted list.")
LAYOUT = PromptLayout(system_prompt="SYS", template="Context:\n{context}\n\nQuestion: {question}")


def _llm(replies: dict[str, list[dict[str, str]]], seen: list[dict] | None = None) -> httpx.MockTransport:
    """A fake /chat/completions that answers per chunk title with the given QA pairs."""

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path.endswith("/chat/completions")
        body = json.loads(request.content)
        if seen is not None:
            seen.append(body)
        prompt = body["messages"][-1]["content"]
        title = next(t for t in replies if f"Passage title: {t}" in prompt)
        content = "Here you go:\n" + json.dumps(replies[title])
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": content}}]})

    return httpx.MockTransport(handler)


@pytest.fixture
def fake_llm(monkeypatch):
    """Route the generator's HTTP client through `transport` instead of the network."""

    def install(transport: httpx.BaseTransport) -> None:
        monkeypatch.setattr(httpx, "Client", partial(httpx.Client, transport=transport))

    return install


def _config(**kwargs) -> SyntheticConfig:
    kwargs.setdefault("min_support", 0.3)
    return SyntheticConfig(base_url="http://llm.test/v1", model="gen", **kwargs)


def test_unsupported_and_duplicate_pairs_are_dropped(encoder, fake_llm):
    replies = {
        "Generators": [
            {"question": "What does a generator function use?", "answer": "It uses the yield statement."},
            {"question": "Who won the 1998 world cup?", "answer": "France won the football final."},
            {"question": "How do I sort a list?", "answer": "A generator function produces values lazily."},
        ],
        "Sorting": [
            {"question": "What does a generator function use??", "answer": "sorted returns a new sorted list."},
            {"question": "What does sorted return?", "answer": "The sorted function returns a new list."},
        ],
    }
    seen: list[dict] = []
    fake_llm(_llm(replies, seen))
    config = _config(questions_per_chunk=3, api_key="k")
    result = generate_synthetic(
        [GENERATORS, SORTING],
        config=config,
        encoder=encoder,
        real_questions=["how do I sort a list"],
        layout=LAYOUT,
        style_examples=["Answer: x\nSource: y"],
    )
    kept = [(e.question, e.chunk_id) for e in result.examples]
    assert kept == [("What does a generator function use?", "c-gen"), ("What does sorted return?", "c-sort")]
    assert result.counts == Counter(chunks=2, generated=5, dropped_unsupported=1, dropped_duplicate=2, kept=2)
    assert result.examples[1].prompt == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": f"Context:\n[1] Sorting\n{SORTING.text}\n\nQuestion: What does sorted return?"},
    ]
    assert "Answer: x" in seen[0]["messages"][-1]["content"]  # style examples reach the generator
    assert seen[0]["model"] == "gen"


def test_llm_errors_and_garbage_are_counted_not_fatal(encoder, fake_llm):
    def handler(request: httpx.Request) -> httpx.Response:
        if "Generators" in json.loads(request.content)["messages"][-1]["content"]:
            return httpx.Response(500, text="boom")
        return httpx.Response(200, json={"choices": [{"message": {"content": "no idea"}}]})

    fake_llm(httpx.MockTransport(handler))
    result = generate_synthetic(
        [GENERATORS, SORTING],
        config=_config(),
        encoder=encoder,
        real_questions=[],
        layout=LAYOUT,
    )
    assert result.examples == []
    assert result.counts["llm_errors"] == 1 and result.counts["unparseable"] == 1


def test_parse_pairs_accepts_json_objects_and_q_a_lines():
    assert parse_pairs('{"pairs": [{"question": "q?", "answer": "a."}]}') == [("q?", "a.")]
    assert parse_pairs("Q: first?\nA: one.\nQ2: second?\nA2: two.") == [("first?", "one."), ("second?", "two.")]
    assert parse_pairs('[{"question": "", "answer": "x"}]') == []


def test_rarely_retrieved_chunks_are_preferred():
    counts = count_retrievals([{"ids": ["c-sort", "c-sort"]}, {"ids": ["c-sort"]}, {}, None])
    assert counts == Counter({"c-sort": 3})
    chosen = rarely_retrieved([SORTING, GENERATORS], counts, SyntheticConfig(base_url="x", model="m"))
    assert [c.id for c in chosen] == ["c-gen"]
    chosen = rarely_retrieved([SORTING, GENERATORS], counts, SyntheticConfig(base_url="x", model="m", max_retrievals=5))
    assert [c.id for c in chosen] == ["c-gen", "c-sort"]


def test_build_dataset_adds_filtered_synthetic_rows(db, add_event, encoder, tmp_path, fake_llm):
    chunks = [GENERATORS, SORTING]
    IndexStore(tmp_path / "index").save(VectorIndex.build(chunks, encoder.encode([c.text for c in chunks])))
    add_event("how do I sort a list", "Use sorted().", {"rating": 5}, retrieved_ids=["c-sort"])
    fake_llm(_llm({
        "Generators": [
            {"question": "What does a generator function use?", "answer": "It uses the yield statement."},
            {"question": "How do I sort a list", "answer": "A generator function uses yield."},
            {"question": "Capital of France?", "answer": "Paris is the capital."},
        ],
    }))
    card = build_dataset(
        db,
        tmp_path / "ds",
        embedder=encoder,
        holdout_fraction=0.0,
        select=SelectionConfig(enabled=False),
        synthetic=_config(index_dir=tmp_path / "index", questions_per_chunk=3),
    )
    rows = read_rows(tmp_path / "ds" / TRAIN_FILE) + read_rows(tmp_path / "ds" / HOLDOUT_FILE)
    synthetic = [r for r in rows if r["source"] == "synthetic"]
    assert [r["completion"][0]["content"] for r in synthetic] == ["It uses the yield statement."]
    assert card.counts["by_source"]["train"] == {"rated": 1, "synthetic": 1}
    assert card.stages["synthetic_added"] == 1
    assert card.synthetic["counts"] == {
        "chunks": 1,
        "generated": 3,
        "dropped_unsupported": 1,
        "dropped_duplicate": 1,
        "kept": 1,
    }
    assert "api_key" not in card.synthetic["config"]


@pytest.mark.slow
def test_synthetic_qa_against_the_embedded_model_server():
    """The real parts: SmolLM2 behind the embedded server is asked for pairs, real embeddings judge them.

    Measured: SmolLM2-135M does not follow the JSON instruction (it repeats "Question 1:" and a sentence of
    the passage), so every reply is counted unparseable and nothing is kept: garbage never becomes a
    training row. A larger generator behind `SyntheticConfig.base_url` is what makes pairs.
    """
    from pydoc_data.topics import topics
    from types import SimpleNamespace

    from retrieval.embedder import Embedder
    from serving.server import ServerThread
    from store.config import default_embedding_model
    from store.prompts import DEFAULT_SYSTEM_PROMPT, DEFAULT_TEMPLATE

    chunks = [SimpleNamespace(id=f"pydoc:{name}#0", title=name, source=f"pydoc:{name}", text=topics[name][:900])
              for name in ("for", "with")]
    layout = PromptLayout(system_prompt=DEFAULT_SYSTEM_PROMPT, template=DEFAULT_TEMPLATE)
    with ServerThread(model="default", max_batch=4) as server:
        model = httpx.get(f"{server.base_url}/models").json()["data"][0]["id"]
        before = httpx.get(f"{server.url}/stats").json()["completed"]
        config = SyntheticConfig(base_url=server.base_url, model=model, temperature=0, max_tokens=96,
                                 min_support=0.3)
        result = generate_synthetic(chunks, config=config, encoder=Embedder(default_embedding_model()),
                                    real_questions=["How do I loop over a list?"], layout=layout)
        served = httpx.get(f"{server.url}/stats").json()["completed"] - before
    counts = result.counts
    # 96 tokens hold a pair or two of JSON; a larger generator would be given more (the default is 512)
    assert served == 2 and counts["chunks"] == 2 and counts["llm_errors"] == 0  # every chunk was asked, answered
    assert counts["unparseable"] == 2 or counts["generated"] > 0  # every reply is either pairs or counted
    assert counts["kept"] == len(result.examples) <= counts["generated"]
    for example in result.examples:  # what was kept is grounded in its chunk and laid out as the proxy would
        assert example.support >= config.min_support
        assert example.chunk_id in {c.id for c in chunks}
        assert example.prompt[0]["content"] == DEFAULT_SYSTEM_PROMPT
        assert example.question in example.prompt[-1]["content"]
