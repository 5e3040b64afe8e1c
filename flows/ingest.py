"""ingest: the bundled corpus, a directory or a file of URLs -> a new index version.

Proxies notice the new version on their own within a refresh interval (they poll INDEX_DIR/CURRENT).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from retrieval.corpus import Document


@task(retries=2, retry_delay_seconds=10)
def load_documents(corpus: str) -> list[Document]:
    from retrieval.corpus import load_corpus

    return load_corpus(corpus)


@task
def build_version(documents: list[Document], index_dir: str, embedding_model: str, kind: str) -> dict:
    from retrieval.build import build_index
    from retrieval.embedder import Embedder
    from retrieval.index import IndexStore

    index = build_index(documents, Embedder(embedding_model), IndexStore(index_dir), kind=kind)
    return {"index_version": index.version, "documents": len(documents), "chunks": len(index), "kind": index.kind}


@flow(name="ingest")
def ingest(corpus: str = "pydoc", kind: str = "flat") -> dict:
    from store.config import Settings

    settings = Settings()
    log = get_run_logger()
    documents = load_documents(corpus)
    built = build_version(documents, str(settings.index_dir), settings.embedding_model, kind)
    log.info(f"index {built['index_version']}: {built['chunks']} chunks from {built['documents']} documents")
    return built
