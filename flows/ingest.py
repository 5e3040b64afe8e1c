"""ingest: the bundled corpus, a directory or a file of URLs -> (optional LLM metadata) -> a new index version.

With METADATA_API_BASE set, each document gets a title, tags and a category from that endpoint; a
document whose metadata cannot be had is indexed without it (counted in the result and logged).
Proxies notice the new version on their own within a refresh interval (they poll INDEX_DIR/CURRENT).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.observability import observed
from retrieval.corpus import Document
from retrieval.index import IndexKind

if TYPE_CHECKING:
    from retrieval.metadata import Extraction


@task(retries=2, retry_delay_seconds=10)
def load_documents(corpus: str) -> list[Document]:
    from retrieval.corpus import load_corpus

    return load_corpus(corpus)


# No retries: a failed call only costs its own document the metadata. NO_CACHE: the inputs hold a key.
@task(cache_policy=NO_CACHE)
def extract_metadata(documents: list[Document], api_base: str, model: str, api_key: str | None,
                     timeout_s: float) -> Extraction:
    from retrieval.metadata import extract_documents

    log = get_run_logger()
    extraction = extract_documents(documents, api_base, model, api_key, timeout_s)
    for source, failure in extraction.failures.items():
        log.warning(f"no metadata for {source} ({failure.outcome}), indexed without it: {failure}")
    log.info(f"metadata from {model}: {extraction.counts()}")
    return extraction


@task
def build_version(documents: list[Document], index_dir: str, embedding_model: str, kind: str,
                  extraction: Extraction | None = None) -> dict:
    from retrieval.build import index_version

    return index_version(documents, index_dir=index_dir, embedding_model=embedding_model, kind=kind,
                         extraction=extraction)


@observed
@flow(name="ingest")
def ingest(corpus: str = "pydoc", kind: IndexKind = "flat") -> dict:
    from store.config import Settings

    settings = Settings()
    log = get_run_logger()
    documents = load_documents(corpus)
    extraction = None
    if settings.metadata_api_base:
        extraction = extract_metadata(documents, settings.metadata_api_base, settings.metadata_model,
                                      settings.llm_key(), settings.llm_timeout_s)
    built = build_version(documents, str(settings.index_dir), settings.embedding_model, kind, extraction)
    log.info(f"index {built['index_version']}: {built['chunks']} chunks from {built['documents']} documents")
    return built
