from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from retrieval.fetch import FetchError, UnsafeURLError, fetch_url, html_to_text

PUBLIC_IP = "93.184.216.34"
PAGE = (
    "<html><head><title>Ocean Currents Explained</title><script>var tracking = 1;</script></head>"
    "<body><nav>Home | About</nav><article><h1>Ocean Currents Explained</h1>"
    "<p>Ocean currents move heat from the equator toward the poles and shape the climate.</p>"
    "<p>The Gulf Stream keeps western Europe milder than other places at the same latitude.</p>"
    "</article></body></html>"
)


def _resolver(table: dict[str, list[str]]):
    async def resolve(host: str, port: int) -> list[str]:
        return table[host]

    return resolve


class _Recorder:
    """An httpx.MockTransport handler that records every request it is asked to send."""

    def __init__(self, responses: dict[str, httpx.Response] | None = None, default: httpx.Response | None = None):
        self.requests: list[httpx.Request] = []
        self.responses = responses or {}
        self.default = default or httpx.Response(200, headers={"Content-Type": "text/html"}, text=PAGE)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.responses.get(request.headers["host"], self.default)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("file:///etc/passwd", "scheme"),
        ("ftp://example.com/file.txt", "scheme"),
        ("gopher://example.com/", "scheme"),
        ("http://10.0.0.5/", "private"),
        ("http://192.168.1.1:8080/admin", "private"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://[fe80::1]/", "link-local"),
        ("http://2130706433/", "numeric"),
        ("http://0x7f.1/", "numeric"),
        ("http://127.1/", "numeric"),
        ("http://user:pass@example.com/", "credentials"),
    ],
)
async def test_refuses_unsafe_urls_without_sending_anything(url: str, reason: str) -> None:
    recorder = _Recorder()
    with pytest.raises(UnsafeURLError, match=reason):
        await fetch_url(url, transport=recorder.transport, resolver=_resolver({"example.com": [PUBLIC_IP]}))
    assert recorder.requests == []


async def test_refuses_a_hostname_that_resolves_to_loopback() -> None:
    recorder = _Recorder()
    resolver = _resolver({"sneaky.example": ["127.0.0.1"]})
    with pytest.raises(UnsafeURLError, match=r"sneaky\.example resolves to: loopback address 127\.0\.0\.1"):
        await fetch_url("https://sneaky.example/x", transport=recorder.transport, resolver=resolver)
    assert recorder.requests == []


async def test_refuses_when_any_resolved_address_is_private() -> None:
    recorder = _Recorder()
    resolver = _resolver({"mixed.example": [PUBLIC_IP, "10.9.8.7"]})
    with pytest.raises(UnsafeURLError, match="private"):
        await fetch_url("http://mixed.example/", transport=recorder.transport, resolver=resolver)
    assert recorder.requests == []


async def test_redirect_to_an_internal_host_is_refused_before_it_is_requested() -> None:
    recorder = _Recorder(
        responses={"public.example": httpx.Response(302, headers={"Location": "http://internal.example/"})}
    )
    resolver = _resolver({"public.example": [PUBLIC_IP], "internal.example": ["10.1.2.3"]})
    with pytest.raises(UnsafeURLError, match=r"internal\.example resolves to: private address 10\.1\.2\.3"):
        await fetch_url("http://public.example/start", transport=recorder.transport, resolver=resolver)
    assert [(r.url.host, r.headers["host"]) for r in recorder.requests] == [(PUBLIC_IP, "public.example")]


async def test_redirect_to_a_non_http_scheme_is_refused() -> None:
    recorder = _Recorder(default=httpx.Response(301, headers={"Location": "file:///etc/passwd"}))
    with pytest.raises(UnsafeURLError, match="scheme"):
        await fetch_url(
            "http://a.example/", transport=recorder.transport, resolver=_resolver({"a.example": [PUBLIC_IP]})
        )
    assert len(recorder.requests) == 1


async def test_too_many_redirects() -> None:
    recorder = _Recorder(default=httpx.Response(302, headers={"Location": "/again"}))
    with pytest.raises(UnsafeURLError, match="too many redirects"):
        await fetch_url(
            "http://loop.example/",
            max_redirects=3,
            transport=recorder.transport,
            resolver=_resolver({"loop.example": [PUBLIC_IP]}),
        )
    assert len(recorder.requests) == 4


async def test_happy_path_connects_to_the_checked_ip_with_the_original_host() -> None:
    recorder = _Recorder(
        responses={"www.example.com": httpx.Response(301, headers={"Location": "https://docs.example.com/ocean?q=1"})}
    )
    resolver = _resolver({"www.example.com": [PUBLIC_IP], "docs.example.com": ["2606:2800:220:1::1"]})
    page = await fetch_url("http://www.example.com/", transport=recorder.transport, resolver=resolver)
    assert page.url == "http://www.example.com/"
    assert page.final_url == "https://docs.example.com/ocean?q=1"
    assert page.content_type == "text/html"
    assert page.title == "Ocean Currents Explained"
    assert "Gulf Stream" in page.text and "tracking" not in page.text
    first, second = recorder.requests
    assert (str(first.url), first.headers["host"]) == (f"http://{PUBLIC_IP}/", "www.example.com")
    assert "sni_hostname" not in first.extensions
    assert str(second.url) == "https://[2606:2800:220:1::1]/ocean?q=1"
    assert second.headers["host"] == "docs.example.com"
    assert second.extensions["sni_hostname"] == "docs.example.com"


async def test_plain_text_page() -> None:
    recorder = _Recorder(
        default=httpx.Response(
            200,
            headers={"Content-Type": "text/plain; charset=utf-8"},
            text="Release notes\n\nEverything is faster now.",
        )
    )
    page = await fetch_url(
        "https://t.example/notes.txt", transport=recorder.transport, resolver=_resolver({"t.example": [PUBLIC_IP]})
    )
    assert (page.title, page.text) == ("Release notes", "Release notes\n\nEverything is faster now.")


async def test_too_large_by_content_length() -> None:
    recorder = _Recorder(default=httpx.Response(200, headers={"Content-Type": "text/html"}, text="x" * 5000))
    with pytest.raises(FetchError, match="too large"):
        await fetch_url(
            "http://big.example/",
            max_bytes=1000,
            transport=recorder.transport,
            resolver=_resolver({"big.example": [PUBLIC_IP]}),
        )


async def test_too_large_while_streaming_without_content_length() -> None:
    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            while True:
                yield b"y" * 1024

    recorder = _Recorder(default=httpx.Response(200, headers={"Content-Type": "text/plain"}, stream=Endless()))
    with pytest.raises(FetchError, match="too large"):
        await fetch_url(
            "http://stream.example/",
            max_bytes=10_000,
            transport=recorder.transport,
            resolver=_resolver({"stream.example": [PUBLIC_IP]}),
        )


@pytest.mark.parametrize("content_type", ["application/octet-stream", "image/png", "application/pdf", ""])
async def test_non_text_content_is_refused(content_type: str) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    recorder = _Recorder(default=httpx.Response(200, headers=headers, content=b"\x89PNG..."))
    with pytest.raises(FetchError, match="content type"):
        await fetch_url(
            "http://bin.example/", transport=recorder.transport, resolver=_resolver({"bin.example": [PUBLIC_IP]})
        )


async def test_upstream_error_status() -> None:
    recorder = _Recorder(default=httpx.Response(404, text="nope"))
    with pytest.raises(FetchError, match="404"):
        await fetch_url(
            "http://gone.example/", transport=recorder.transport, resolver=_resolver({"gone.example": [PUBLIC_IP]})
        )


async def test_overall_timeout() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, text="late")

    with pytest.raises(FetchError, match="timed out"):
        await fetch_url(
            "http://slow.example/",
            timeout_s=0.2,
            transport=httpx.MockTransport(slow),
            resolver=_resolver({"slow.example": [PUBLIC_IP]}),
        )


def test_html_to_text_falls_back_to_a_tag_strip() -> None:
    title, text = html_to_text(PAGE, "https://example.com/ocean")
    assert title == "Ocean Currents Explained" and "Gulf Stream" in text
    # Too little markup for trafilatura to find main content: the fallback still yields text.
    title, text = html_to_text("<title>T</title><style>p{}</style><b>bold</b> words")
    assert title == "T" and "bold words" in text and "p{}" not in text
