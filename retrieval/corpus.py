"""Load documents to index: Python's bundled doc topics, a directory of files, or a list of URLs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst"})
HTML_SUFFIXES = frozenset({".html", ".htm"})
_URL_PREFIXES = ("http://", "https://")
_URL_FETCH_CONCURRENCY = 4

T = TypeVar("T")


@dataclass(frozen=True)
class Document:
    title: str
    source: str
    text: str


def load_corpus(spec: str) -> list[Document]:
    """`"pydoc"`, a directory of .txt/.md/.rst/.html/.htm files, or a file with one URL per line."""
    if spec == "pydoc":
        return _pydoc_topics()
    path = Path(spec).expanduser()
    if path.is_dir():
        return _directory(path)
    if path.is_file():
        urls = _url_lines(path)
        if urls is not None:
            return _fetch_all(urls)
        if path.suffix.lower() in TEXT_SUFFIXES | HTML_SUFFIXES:
            document = _read_document(path, path.name)
            return [document] if document else []
        raise ValueError(f"{spec}: not a file of http(s) URLs (one per line) nor a .txt/.md/.rst/.html file")
    raise ValueError(f"unknown corpus {spec!r}: expected 'pydoc', a directory, or a file of URLs")


def _pydoc_topics() -> list[Document]:
    from pydoc_data.topics import topics

    return [
        Document(title=key, source=f"pydoc:{key}", text=text) for key, text in sorted(topics.items()) if text.strip()
    ]


def _directory(root: Path) -> list[Document]:
    documents = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        # Hidden files and directories (.git, editor swap files) are never corpus content.
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.suffix.lower() not in TEXT_SUFFIXES | HTML_SUFFIXES:
            continue
        document = _read_document(path, relative.as_posix())
        if document is not None:
            documents.append(document)
    if not documents:
        log.warning("no .txt/.md/.rst/.html files with text under %s", root)
    return documents


def _read_document(path: Path, source: str) -> Document | None:
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() in HTML_SUFFIXES:
        from retrieval.fetch import html_to_text

        title, text = html_to_text(raw)
    else:
        text = raw
        title = _title_from_text(raw)
    if not text.strip():
        return None
    return Document(title=title or path.stem, source=source, text=text)


def _title_from_text(text: str, limit: int = 120) -> str:
    """The first line with words in it, minus Markdown '#' marks (rst over/underlines have none)."""
    for line in text.splitlines():
        stripped = line.strip().lstrip("#").strip()
        if any(ch.isalnum() for ch in stripped):
            return stripped[:limit]
    return ""


def _url_lines(path: Path) -> list[str] | None:
    """The URLs if every non-comment line is an http(s) URL; None if this is not a URL list."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        return None
    # Only whole-line comments: a '#' inside a URL is its fragment.
    urls = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if urls and all(url.lower().startswith(_URL_PREFIXES) for url in urls):
        return urls
    return None


def _fetch_all(urls: list[str]) -> list[Document]:
    pages = _run_sync(_fetch_pages(urls))
    documents = [doc for doc in pages if doc is not None]
    if not documents:
        raise ValueError(f"none of the {len(urls)} URLs could be fetched")
    return documents


async def _fetch_pages(urls: list[str]) -> list[Document | None]:
    from retrieval.fetch import FetchError, UnsafeURLError, fetch_url, redact_url

    gate = asyncio.Semaphore(_URL_FETCH_CONCURRENCY)

    async def one(url: str) -> Document | None:
        async with gate:
            try:
                page = await fetch_url(url)
            except (FetchError, UnsafeURLError) as exc:
                # One dead or refused link should not sink a whole corpus build.
                log.warning("skipping a URL: %s", exc)
                return None
            except Exception as exc:
                # Nor one that fetch_url did not foresee (a library's own error escaping it): without this the
                # gather below fails the whole build. Its traceback goes along, as it is a bug in fetch_url.
                log.warning("skipping a URL: %s: %s: %s", redact_url(url), type(exc).__name__, exc, exc_info=True)
                return None
        if not page.text.strip():
            return None
        return Document(title=page.title or page.final_url, source=url, text=page.text)

    return await asyncio.gather(*(one(url) for url in urls))


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, or the same in a helper thread when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
