from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import retrieval.index as index_module
from retrieval.build import add_documents, build_index, chunk_documents, embed_chunks
from retrieval.corpus import Document
from retrieval.index import Chunk, IndexStore, VectorIndex, chunk_id, new_version

DOCUMENTS = [
    Document("Photosynthesis", "bio.txt", "Plants convert sunlight, water and carbon dioxide into glucose and oxygen."),
    Document("Volcanoes", "geo.txt", "Magma rises through the crust and erupts as lava from a volcano."),
    Document("Python lists", "py.txt", "A Python list is a mutable sequence; append adds an item to its end."),
    Document("Baking bread", "food.txt", "Knead the dough, let the yeast make it rise, then bake it in a hot oven."),
    Document("Jazz", "music.txt", "Jazz grew in New Orleans from blues and ragtime, with improvised solos."),
]
QUERIES = {
    "how do plants make oxygen from light": "bio.txt",
    "lava eruption": "geo.txt",
    "add an element to the end of a python list": "py.txt",
    "how long should dough rise before baking": "food.txt",
    "improvisation in New Orleans music": "music.txt",
}


def _chunks(n: int, prefix: str = "c") -> list[Chunk]:
    return [Chunk(id=f"{prefix}{i}", title=f"t{i}", source=f"s{i}", text=f"text {prefix} {i}") for i in range(n)]


def _random_unit(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_real_embeddings_find_the_right_document(embedder, kind: str) -> None:
    chunks = chunk_documents(DOCUMENTS)
    index = VectorIndex.build(chunks, embed_chunks(chunks, embedder), kind=kind)
    assert index.kind == kind and index.dim == embedder.dim == 384 and len(index) == len(DOCUMENTS)
    queries = list(QUERIES)
    vectors = embedder.encode(queries)
    for query, vector in zip(queries, vectors, strict=True):
        hits = index.search(vector, top_k=3)
        assert len(hits) == 3
        assert hits[0].source == QUERIES[query], (query, hits)
        assert hits[0].score >= hits[1].score >= hits[2].score
        assert -1.0 <= hits[-1].score <= hits[0].score <= 1.0 + 1e-5


@pytest.mark.slow
def test_build_index_saves_and_reloads_with_real_embeddings(embedder, tmp_path: Path) -> None:
    store = IndexStore(tmp_path)
    built = build_index(DOCUMENTS, embedder, store)
    assert store.current_version() == built.version
    loaded = store.load()
    query = embedder.encode(["volcano lava"])[0]
    assert [h.id for h in loaded.search(query, 5)] == [h.id for h in built.search(query, 5)]
    assert loaded.search(query, 1)[0].source == "geo.txt"


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_exact_vector_is_top_hit_and_small_index_returns_fewer(kind: str) -> None:
    vectors = _random_unit(50)
    index = VectorIndex.build(_chunks(50), vectors, kind=kind)
    for row in (0, 17, 49):
        hit = index.search(vectors[row], top_k=5)[0]
        assert hit.id == f"c{row}"
        assert hit.score == pytest.approx(1.0, abs=1e-5)
    tiny = VectorIndex.build(_chunks(2), vectors[:2], kind=kind)
    assert len(tiny.search(vectors[0], top_k=10)) == 2
    empty = VectorIndex.build([], np.zeros((0, 16), dtype=np.float32), kind=kind)
    assert empty.search(vectors[0]) == [] and len(empty) == 0


def test_build_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="kind"):
        VectorIndex.build(_chunks(1), _random_unit(1), kind="ivf")
    with pytest.raises(ValueError, match="shape"):
        VectorIndex.build(_chunks(2), _random_unit(3))
    index = VectorIndex.build(_chunks(2), _random_unit(2))
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones(8, dtype=np.float32))


def test_with_added_returns_a_new_index_and_leaves_the_old_one_intact() -> None:
    old_vectors, new_vectors = _random_unit(5, seed=1), _random_unit(3, seed=2)
    old = VectorIndex.build(_chunks(5, "a"), old_vectors)
    new = old.with_added(_chunks(3, "b"), new_vectors)
    assert new is not old and new.version != old.version and new.version > old.version
    assert len(old) == 5 and len(new) == 8
    assert old.search(new_vectors[0], top_k=1)[0].id.startswith("a")
    assert new.search(new_vectors[0], top_k=1)[0].id == "b0"
    # Chunks already present are not added twice.
    again = new.with_added(_chunks(3, "b"), new_vectors)
    assert len(again) == 8


def test_chunk_ids_are_stable_across_rebuilds() -> None:
    first = chunk_documents(DOCUMENTS, max_chars=40, overlap=10)
    second = chunk_documents(DOCUMENTS, max_chars=40, overlap=10)
    assert [c.id for c in first] == [c.id for c in second]
    assert len({c.id for c in first}) == len(first)
    assert chunk_id("a", 0, "x") != chunk_id("a", 1, "x") != chunk_id("b", 1, "x")


def test_versions_are_unique_and_sortable() -> None:
    versions = [new_version() for _ in range(200)]
    assert versions == sorted(versions) and len(set(versions)) == 200
    assert all(index_module._VERSION_RE.match(v) for v in versions)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_save_load_round_trip_current_and_versions(tmp_path: Path, kind: str) -> None:
    store = IndexStore(tmp_path / "index")
    assert store.current_version() is None and store.versions() == []
    with pytest.raises(FileNotFoundError, match="no index"):
        store.load()
    vectors = _random_unit(20)
    first = VectorIndex.build(_chunks(20), vectors, kind=kind)
    assert store.save(first) == first.version
    second = first.with_added(_chunks(2, "z"), _random_unit(2, seed=9))
    store.save(second)
    assert store.current_version() == second.version
    assert store.versions() == [first.version, second.version]
    loaded = store.load()
    assert (loaded.version, loaded.kind, loaded.dim, loaded.chunks) == (second.version, kind, 16, second.chunks)
    assert loaded.search(vectors[3], 3) == second.search(vectors[3], 3)
    assert len(store.load(first.version)) == 20
    with pytest.raises(FileNotFoundError):
        store.load("v20000101T000000000000Z-abcdef")


def test_crash_mid_save_leaves_the_old_version_current(tmp_path: Path, monkeypatch) -> None:
    store = IndexStore(tmp_path)
    old = VectorIndex.build(_chunks(4), _random_unit(4))
    store.save(old)
    new = old.with_added(_chunks(1, "n"), _random_unit(1, seed=3))

    def crash(index: VectorIndex) -> bytes:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(index_module, "_meta_json", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.save(new)
    assert store.current_version() == old.version
    assert store.versions() == [old.version]
    assert not (tmp_path / new.version).exists()
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # the failed save cleaned up
    assert len(store.load()) == 4

    # A hard crash gets no cleanup: the half-written temp dir stays, but is never a version.
    monkeypatch.setattr(index_module.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(RuntimeError):
        store.save(new)
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    assert store.versions() == [old.version]
    assert store.load().version == old.version

    monkeypatch.undo()
    store.save(new)
    assert store.current_version() == new.version and len(store.load()) == 5


def test_concurrent_add_documents_under_the_lock_keeps_both(tmp_path: Path, hash_embedder, monkeypatch) -> None:
    store = IndexStore(tmp_path)
    build_index([Document("seed", "seed.txt", "the first document")], hash_embedder, store)
    real_load = IndexStore.load

    def slow_load(self: IndexStore, version: str | None = None) -> VectorIndex:
        # Widens the read-modify-write window so that, without the lock, one writer would lose.
        index = real_load(self, version)
        time.sleep(0.3)
        return index

    monkeypatch.setattr(IndexStore, "load", slow_load)
    batches = [
        [Document(f"a{i}", f"a{i}.txt", f"alpha document number {i}") for i in range(3)],
        [Document(f"b{i}", f"b{i}.txt", f"beta document number {i}") for i in range(4)],
    ]
    errors: list[BaseException] = []

    def writer(docs: list[Document]) -> None:
        try:
            add_documents(docs, hash_embedder, IndexStore(tmp_path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(docs,)) for docs in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    final = real_load(store)
    assert sorted(c.source for c in final.chunks) == sorted(["seed.txt"] + [d.source for b in batches for d in b])
    assert len(store.versions()) == 3


def test_add_documents_starts_an_empty_index(tmp_path: Path, hash_embedder) -> None:
    store = IndexStore(tmp_path)
    index = add_documents([Document("t", "s", "some text")], hash_embedder, store)
    assert len(index) == 1 and store.current_version() == index.version
    # Re-adding the same document is a no-op: no duplicate chunks, no new version.
    again = add_documents([Document("t", "s", "some text")], hash_embedder, store)
    assert again.version == index.version and len(store.versions()) == 1


@pytest.mark.parametrize(("kind", "faiss_type"), [("flat", "IndexFlatIP"), ("hnsw", "IndexHNSWFlat")])
def test_each_kind_builds_its_own_faiss_index_and_keeps_it_through_the_store(tmp_path, kind, faiss_type):
    import faiss

    index = VectorIndex.build(_chunks(10), _random_unit(10), kind=kind)
    assert type(index._index).__name__ == faiss_type and index._index.metric_type == faiss.METRIC_INNER_PRODUCT
    if kind == "hnsw":
        graph = index._index.hnsw
        assert (graph.efConstruction, graph.efSearch, graph.nb_neighbors(1)) == (200, 64, 32)  # M = 32
    store = IndexStore(tmp_path / "a" / "b")  # parents are made
    store.save(index)
    assert store.save(index) == index.version  # saving a stored version again only points CURRENT at it
    assert type(store.load()._index).__name__ == faiss_type


def test_a_hit_carries_its_chunk_whole():
    chunks = [Chunk("c0", "Title", "doc.txt", "the text", ("tag",), "category"), *_chunks(2, "x")]
    vectors = _random_unit(3)
    (hit,) = VectorIndex.build(chunks, vectors).search(vectors[0], top_k=1)
    assert (hit.id, hit.title, hit.source, hit.text, hit.tags, hit.category) == (
        "c0", "Title", "doc.txt", "the text", ("tag",), "category")  # fmt: skip
    assert hit.score == pytest.approx(1.0, abs=1e-5)


def test_bad_shapes_and_arguments_say_what_is_wrong():
    index = VectorIndex.build(_chunks(2), _random_unit(2))
    with pytest.raises(ValueError, match="^top_k must be >= 1$"):
        index.search(_random_unit(1)[0], top_k=0)
    with pytest.raises(ValueError, match="^embeddings have dimension 8, index has 16$"):
        index.with_added(_chunks(1, "n"), _random_unit(1, dim=8))
    with pytest.raises(ValueError, match="^embeddings need at least one dimension$"):
        VectorIndex.build(_chunks(2), np.zeros((2, 0), dtype=np.float32))
    with pytest.raises(ValueError, match="^index holds 2 vectors but 3 chunks$"):
        VectorIndex(index._index, _chunks(3), kind="flat", version="v", dim=16)


def test_a_chunk_twice_in_one_addition_is_added_once():
    index = VectorIndex.build(_chunks(2), _random_unit(2))
    twice = _chunks(1, "n") * 2
    assert [c.id for c in index.with_added(twice, _random_unit(2, seed=5)).chunks] == ["c0", "c1", "n0"]


def test_a_version_is_the_utc_microsecond_and_the_next_one_is_at_least_one_later(monkeypatch):
    at = 1_796_126_400_123_456_000  # 2026-12-01T12:00:00.123456Z, in nanoseconds
    monkeypatch.setattr(index_module.time, "time_ns", lambda: at)
    monkeypatch.setattr(index_module, "_last_version_ts", 0)
    first, second = new_version(), new_version()
    assert first.startswith("v20261201T120000123456Z-") and second.startswith("v20261201T120000123457Z-")


def test_meta_and_chunks_on_disk(tmp_path):
    import json

    store = IndexStore(tmp_path)
    chunks = [Chunk("c0", "Café", "s", "naïve text")]
    index = VectorIndex.build(chunks, _random_unit(1), kind="hnsw")
    store.save(index)
    directory = tmp_path / index.version
    meta = json.loads((directory / "meta.json").read_text())
    assert {k: v for k, v in meta.items() if k != "created_at"} == {
        "format": 2, "version": index.version, "kind": "hnsw", "dim": 16, "count": 1}  # fmt: skip
    assert meta["created_at"].endswith("+00:00")
    assert "naïve text" in (directory / "chunks.jsonl").read_text(encoding="utf-8")  # UTF-8, not \\u escapes


def test_versions_are_complete_directories_with_version_names_and_loads_say_what_is_missing(tmp_path):
    store = IndexStore(tmp_path)
    index = VectorIndex.build(_chunks(1), _random_unit(1))
    store.save(index)
    (tmp_path / "v20000101T000000000000Z-abcdef").mkdir()  # a version name, but no meta.json: incomplete
    (tmp_path / "not-a-version").mkdir()
    (tmp_path / "not-a-version" / "meta.json").write_text("{}")
    assert store.versions() == [index.version]
    with pytest.raises(ValueError, match="^not an index version: 'not-a-version'$"):
        store.load("not-a-version")
    missing = "v20000101T000000000000Z-abcdef"
    with pytest.raises(FileNotFoundError, match=f"^index version {missing} not found in {tmp_path}$"):
        store.load(missing)


def test_temp_leftovers_older_than_an_hour_are_removed_on_the_next_save(tmp_path):
    import os

    store = IndexStore(tmp_path)
    stale_dir, stale_file, fresh = tmp_path / ".tmp-crashed", tmp_path / ".tmp-CURRENT-x", tmp_path / ".tmp-in-progress"
    stale_dir.mkdir()
    (stale_dir / "index.faiss").write_bytes(b"half")
    stale_file.write_text("v")
    fresh.mkdir()
    hour_and_a_bit = time.time() - 3700
    for path in (stale_dir, stale_file):
        os.utime(path, (hour_and_a_bit, hour_and_a_bit))
    store.save(VectorIndex.build(_chunks(1), _random_unit(1)))
    assert not stale_dir.exists() and not stale_file.exists() and fresh.exists()


def test_chunks_are_cut_to_max_chars_and_named_by_source_position_and_text():
    from retrieval.chunker import chunk_text

    chunks = chunk_documents(DOCUMENTS[:1], max_chars=40, overlap=10)
    texts = chunk_text(DOCUMENTS[0].text, max_chars=40, overlap=10)
    assert [c.text for c in chunks] == texts and len(texts) > 1
    assert [c.id for c in chunks] == [chunk_id("bio.txt", i, text) for i, text in enumerate(texts)]
    assert {c.title for c in chunks} == {"Photosynthesis"}


def test_a_chunk_is_embedded_with_its_title_in_front(hash_embedder):
    embed_chunks([Chunk("a", "Title", "s", "text"), Chunk("b", "", "s", "bare")], hash_embedder)
    assert hash_embedder.calls == [["Title: text", "bare"]]


def test_build_index_keeps_the_kind_asked_for_and_refuses_nothing_to_index(tmp_path: Path, hash_embedder):
    store = IndexStore(tmp_path)
    assert build_index(DOCUMENTS, hash_embedder, store, kind="hnsw").kind == "hnsw"
    assert store.load().kind == "hnsw"
    with pytest.raises(ValueError, match="^no text to index: every document is empty$"):
        build_index([Document("empty", "e.txt", "  ")], hash_embedder, store)


def test_the_hnsw_bench_scores_recall_against_the_exact_index_and_prints_its_rows() -> None:
    import subprocess
    import sys

    from bench.hnsw_search import clustered_unit_vectors, recall_at_k

    assert recall_at_k(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 1], [4, 7, 8]])) == pytest.approx(2 / 3)
    rng = np.random.default_rng(0)
    centres = np.eye(4, 384)
    vectors = clustered_unit_vectors(200, centres, rng)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    nearest = (vectors @ centres.T).max(axis=1)
    assert 0.6 < nearest.mean() < 0.8  # the stated spread: cosine ~0.7 to the centre
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "bench/hnsw_search.py", "--sizes", "300", "--queries", "10", "--ef", "8"],
                          cwd=root, capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| 300 |")]
    assert [row[2].strip() for row in rows] == [
        "faiss, efSearch 8", "VectorIndex.search, hnsw (efSearch 64)", "VectorIndex.search, flat (exact)",
    ]  # fmt: skip
    assert float(rows[-1][3]) == 1.0 and all(0.0 < float(row[3]) <= 1.0 for row in rows)
