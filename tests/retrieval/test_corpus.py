from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import retrieval.fetch as fetch_module
from retrieval.corpus import Document, load_corpus
from retrieval.fetch import FetchedPage, FetchError


def _fake_fetch(monkeypatch, fetched: list[str], title: str = "") -> None:
    """fetch_url answering every URL with a page of its own (title: a format of {url}), "broken" ones with a 500."""

    async def fake_fetch(url: str, **kwargs) -> FetchedPage:
        fetched.append(url)
        if "broken" in url:
            raise FetchError(f"{url}: upstream answered 500")
        return FetchedPage(url, url, "text/html", title.format(url=url), f"Body of {url}")

    monkeypatch.setattr(fetch_module, "fetch_url", fake_fetch)


def test_pydoc_corpus() -> None:
    documents = load_corpus("pydoc")
    assert len(documents) > 50
    by_title = {doc.title: doc for doc in documents}
    assert {"assert", "if", "while"} <= set(by_title)
    assert by_title["assert"].source == "pydoc:assert"
    assert "assert" in by_title["assert"].text
    assert all(doc.text.strip() for doc in documents)


def test_directory_corpus(tmp_path: Path) -> None:
    (tmp_path / "guide.html").write_text(
        "<html><head><title>Install Guide</title></head><body><script>evil()</script>"
        "<article><p>Run the installer and follow the prompts on screen to finish.</p></article></body></html>"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("Meeting notes\n\nWe agreed to ship on Friday.")
    (tmp_path / "sub" / "readme.md").write_text("# Project Readme\n\nHow to build it.")
    (tmp_path / "script.py").write_text("print('not corpus')")
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / "empty.txt").write_text("   \n")
    documents = load_corpus(str(tmp_path))
    assert [doc.source for doc in documents] == ["guide.html", "sub/notes.txt", "sub/readme.md"]
    html, notes, readme = documents
    assert html.title == "Install Guide" and "installer" in html.text and "evil" not in html.text
    assert notes.title == "Meeting notes" and "Friday" in notes.text
    assert readme.title == "Project Readme"


def test_url_list_corpus(tmp_path: Path, monkeypatch) -> None:
    fetched: list[str] = []
    _fake_fetch(monkeypatch, fetched, title="Title of {url}")
    urls = tmp_path / "urls.txt"
    urls.write_text("# docs to index\nhttps://a.example/one\n\n  https://b.example/broken\nhttp://c.example/#frag\n")
    documents = load_corpus(str(urls))
    assert sorted(fetched) == ["http://c.example/#frag", "https://a.example/one", "https://b.example/broken"]
    assert documents == [
        Document("Title of https://a.example/one", "https://a.example/one", "Body of https://a.example/one"),
        Document("Title of http://c.example/#frag", "http://c.example/#frag", "Body of http://c.example/#frag"),
    ]


def test_single_text_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("Just a note\nwith two lines")
    assert load_corpus(str(path)) == [Document("Just a note", "one.txt", "Just a note\nwith two lines")]


@pytest.mark.parametrize("spec", ["nope-not-a-thing", "/definitely/missing/dir"])
def test_unknown_spec_is_a_value_error(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus(spec)


def test_a_file_that_is_neither_urls_nor_text(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a file of http"):
        load_corpus(str(path))


def test_titles_lose_only_markdown_marks_and_a_text_without_words_is_titled_by_its_file(tmp_path: Path) -> None:
    (tmp_path / "xml.md").write_text("## XML parsing\n\nElementTree reads it.")
    (tmp_path / "rule.txt").write_text("-----\n=====\n")  # text, but no line with a word in it
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait")  # not UTF-8: read with a replacement character
    by_source = {doc.source: doc for doc in load_corpus(str(tmp_path))}
    assert by_source["xml.md"].title == "XML parsing"
    assert by_source["rule.txt"].title == "rule"
    assert by_source["latin1.txt"].text == "caf\ufffd au lait"


def test_an_empty_directory_or_file_gives_no_documents_and_says_so(tmp_path: Path, caplog) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text(" \n")
    with caplog.at_level("WARNING", logger="retrieval.corpus"):
        assert load_corpus(str(empty)) == []
        assert load_corpus(str(empty / "blank.txt")) == []
    assert [r.getMessage() for r in caplog.records] == [f"no .txt/.md/.rst/.html files with text under {empty}"]
    caplog.clear()
    (empty / "one.txt").write_text("words")
    with caplog.at_level("WARNING", logger="retrieval.corpus"):
        assert len(load_corpus(str(empty))) == 1
    assert caplog.records == []




def test_url_lists_allow_indented_comments_skip_dead_links_aloud_and_fail_when_all_are_dead(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    fetched: list[str] = []
    _fake_fetch(monkeypatch, fetched)
    urls = tmp_path / "urls.txt"
    urls.write_text("   # an indented comment\nhttps://a.example/ok\nhttps://b.example/broken\n")
    with caplog.at_level("WARNING", logger="retrieval.corpus"):
        (document,) = load_corpus(str(urls))
    assert document == Document("https://a.example/ok", "https://a.example/ok", "Body of https://a.example/ok")
    skipped = "skipping a URL: https://b.example/broken: upstream answered 500"
    assert [r.getMessage() for r in caplog.records] == [skipped]
    dead = tmp_path / "dead.txt"
    dead.write_text("https://b.example/broken\nhttps://c.example/broken\n")
    with pytest.raises(ValueError, match="^none of the 2 URLs could be fetched$"):
        load_corpus(str(dead))


def test_a_link_whose_fetch_raises_something_unforeseen_is_skipped_aloud_and_the_others_kept(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    fetched: list[str] = []
    _fake_fetch(monkeypatch, fetched)
    unforeseen = fetch_module.fetch_url

    async def fetch(url: str, **kwargs) -> FetchedPage:
        if "odd" in url:  # what fetch_url let escape before: httpx.InvalidURL from a redirect, no FetchError
            raise httpx.InvalidURL("For absolute URLs, path must be empty or begin with '/'")
        return await unforeseen(url, **kwargs)

    monkeypatch.setattr(fetch_module, "fetch_url", fetch)
    urls = tmp_path / "urls.txt"
    urls.write_text("https://a.example/ok\nhttps://b.example/odd?token=SECRET\nhttps://c.example/ok\n")
    with caplog.at_level("WARNING", logger="retrieval.corpus"):
        documents = load_corpus(str(urls))
    assert [d.source for d in documents] == ["https://a.example/ok", "https://c.example/ok"]
    assert [r.getMessage() for r in caplog.records] == [
        "skipping a URL: https://b.example/odd: InvalidURL: For absolute URLs, path must be empty or begin with '/'"
    ]


async def test_a_url_list_loads_from_inside_a_running_event_loop(tmp_path: Path, monkeypatch) -> None:
    fetched: list[str] = []
    _fake_fetch(monkeypatch, fetched)
    urls = tmp_path / "urls.txt"
    urls.write_text("https://a.example/ok\n")
    assert [d.source for d in load_corpus(str(urls))] == ["https://a.example/ok"]  # a helper thread runs its loop
