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
        ("http://[fec0::1]/", "site-local"),  # deprecated (RFC 3879), yet ipaddress calls it global
        ("http://2130706433/", "numeric"),
        ("http://0x7f.1/", "numeric"),
        ("http://127.1/", "numeric"),
        ("http://user:pass@example.com/", "credentials"),
        ("http://xn--/", "invalid URL"),  # a malformed IDNA A-label: idna's UnicodeError, once a 500
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


@pytest.mark.parametrize(("location", "reason"), [("http://[::1]/", "loopback"), ("https://[fec0::1]/", "site-local")])
async def test_redirect_to_an_internal_address_literal_is_refused_before_it_is_requested(location, reason) -> None:
    recorder = _Recorder(default=httpx.Response(302, headers={"Location": location}))
    resolver = _resolver({"a.example": [PUBLIC_IP]})
    with pytest.raises(UnsafeURLError, match=reason):
        await fetch_url("http://a.example/", transport=recorder.transport, resolver=resolver)
    assert [r.headers["host"] for r in recorder.requests] == ["a.example"]


@pytest.mark.parametrize("location", ["http:\\\\x\\y", "https:\\\\127.0.0.1\\", "http://xn--/", "http://xn--a/"])
async def test_a_redirect_to_a_location_that_is_no_url_is_a_fetch_error_naming_the_page(location: str) -> None:
    """httpx raises InvalidURL or idna's UnicodeError (no HTTPError) building a redirect it cannot parse: they
    were a 500 in process_url."""
    recorder = _Recorder(default=httpx.Response(302, headers={"Location": location}))
    with pytest.raises(FetchError) as failed:
        await fetch_url("http://a.example/p?token=SECRET", transport=recorder.transport,
                        resolver=_resolver({"a.example": [PUBLIC_IP]}))
    assert str(failed.value).startswith("http://a.example/p redirects to an invalid URL (")
    assert "SECRET" not in str(failed.value) and len(recorder.requests) == 1


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


class _Endless(httpx.AsyncByteStream):
    """A body that never ends (no Content-Length)."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            yield b"y" * 1024


async def _slow(request: httpx.Request) -> httpx.Response:
    await asyncio.sleep(5)
    return httpx.Response(200, text="late")


async def test_too_large_while_streaming_without_content_length() -> None:
    recorder = _Recorder(default=httpx.Response(200, headers={"Content-Type": "text/plain"}, stream=_Endless()))
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
    with pytest.raises(FetchError) as refused:
        await fetch_url(
            "http://bin.example/", transport=recorder.transport, resolver=_resolver({"bin.example": [PUBLIC_IP]})
        )
    assert str(refused.value) == f"content type {content_type or '(none)'!r} is not text/html or text/plain"


async def test_upstream_error_status() -> None:
    recorder = _Recorder(default=httpx.Response(404, text="nope"))
    with pytest.raises(FetchError, match="404"):
        await fetch_url(
            "http://gone.example/", transport=recorder.transport, resolver=_resolver({"gone.example": [PUBLIC_IP]})
        )


async def test_overall_timeout() -> None:
    with pytest.raises(FetchError, match="timed out"):
        await fetch_url(
            "http://slow.example/",
            timeout_s=0.2,
            transport=httpx.MockTransport(_slow),
            resolver=_resolver({"slow.example": [PUBLIC_IP]}),
        )


def test_html_to_text_falls_back_to_a_tag_strip() -> None:
    title, text = html_to_text(PAGE, "https://example.com/ocean")
    assert title == "Ocean Currents Explained" and "Gulf Stream" in text
    # Too little markup for trafilatura to find main content: the fallback still yields text.
    title, text = html_to_text("<title>T</title><style>p{}</style><b>bold</b> words")
    assert title == "T" and "bold words" in text and "p{}" not in text


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/f", "scheme 'ftp' not allowed; only http and https"),
        ("//example.com/x", "scheme '(none)' not allowed; only http and https"),
        ("http:///path", "URL has no host"),
        ("http://user:pass@example.com/", "credentials in the URL are not allowed"),
        ("http://169.254.169.254/", "host 169.254.169.254: link-local address 169.254.169.254; only public addresses"),
        ("http://[::ffff:127.0.0.1]/", "host ::ffff:127.0.0.1: loopback address 127.0.0.1 (as ::ffff:7f00:1);"),
        ("http://[::]/", "host ::: unspecified address ::;"),
        ("http://224.0.0.1/", "host 224.0.0.1: multicast address 224.0.0.1;"),
        ("http://240.0.0.1/", "host 240.0.0.1: private address 240.0.0.1;"),  # is_private before is_reserved
        ("http://100.64.0.1/", "host 100.64.0.1: non-global address 100.64.0.1;"),  # carrier-grade NAT
        ("http://[2002:a00:1::]/", "host 2002:a00:1::: private address 10.0.0.1 (as 2002:a00:1::);"),  # 6to4
    ],
)
async def test_a_refusal_says_what_was_refused_and_why(url: str, message: str) -> None:
    """The ingest endpoint answers 4xx with this text: it must name the address class and the address."""
    with pytest.raises(UnsafeURLError) as refused:
        await fetch_url(url, transport=_Recorder().transport, resolver=_resolver({"example.com": [PUBLIC_IP]}))
    assert message in str(refused.value)


@pytest.mark.parametrize("host", ["a..b.example", ".example", f"{'a' * 64}.example", ".".join(["a" * 63] * 4) + ".x"])
async def test_a_name_dns_cannot_hold_is_refused_before_it_is_resolved(host: str) -> None:
    asked = []

    async def resolve(name: str, port: int) -> list[str]:
        asked.append(name)
        return [PUBLIC_IP]

    recorder = _Recorder()
    with pytest.raises(UnsafeURLError, match="is not a valid host name"):
        await fetch_url(f"http://{host}/", transport=recorder.transport, resolver=resolve)
    assert asked == [] and recorder.requests == []
    # 63-character labels, 253 characters in all, a trailing dot: the longest name DNS holds is resolved
    longest = ".".join(["a" * 63] * 3 + ["a" * 61]) + "."
    await fetch_url(f"http://{longest}/", transport=recorder.transport, resolver=resolve)
    assert asked == [longest]


async def test_a_resolver_codec_error_is_a_refusal_not_a_crash() -> None:
    async def idna_refuses(host: str, port: int) -> list[str]:
        raise UnicodeError("label empty or too long")

    with pytest.raises(UnsafeURLError, match="'x.example' is not a valid host name: label empty or too long"):
        await fetch_url("http://x.example/", transport=_Recorder().transport, resolver=idna_refuses)


async def test_resolution_failures_say_which_host() -> None:
    async def gone(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    cases = [(gone, FetchError, "could not resolve x.example: Name or service not known"),
             (_resolver({"x.example": []}), FetchError, "could not resolve x.example: no addresses"),
             (_resolver({"x.example": ["not-an-ip"]}), UnsafeURLError,
              "x.example resolved to something that is not an IP address: 'not-an-ip'")]
    for resolver, error, message in cases:
        recorder = _Recorder()
        with pytest.raises(error) as failed:
            await fetch_url("http://x.example/", transport=recorder.transport, resolver=resolver)
        assert str(failed.value) == message and recorder.requests == []


@pytest.mark.parametrize(("url", "port"), [("http://p.example/", 80), ("https://p.example/", 443),
                                           ("http://p.example:8080/a", 8080)])
async def test_the_port_is_resolved_and_connected_to_as_given(url: str, port: int) -> None:
    asked: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return [PUBLIC_IP]

    recorder = _Recorder()
    await fetch_url(url, transport=recorder.transport, resolver=resolve)
    (request,) = recorder.requests
    assert asked == [("p.example", port)]
    assert (request.url.host, request.url.port or {"http": 80, "https": 443}[request.url.scheme]) == (PUBLIC_IP, port)
    assert request.headers["host"] == ("p.example:8080" if port == 8080 else "p.example")
    assert request.method == "GET" and request.headers["user-agent"].startswith("abloop-fetch/")
    assert request.headers["accept"].startswith("text/html, text/plain")


async def test_an_address_that_refuses_is_skipped_and_duplicates_are_tried_once() -> None:
    tried: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        tried.append(request.url.host)
        if request.url.host == PUBLIC_IP:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, headers={"Content-Type": "text/plain"}, text="second address")

    other = "93.184.216.35"
    resolver = _resolver({"two.example": [PUBLIC_IP, PUBLIC_IP, other]})
    page = await fetch_url("http://two.example/", transport=httpx.MockTransport(handler), resolver=resolver)
    assert page.text == "second address" and tried == [PUBLIC_IP, other]

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(FetchError) as failed:
        await fetch_url("http://two.example/", transport=httpx.MockTransport(refuse), resolver=resolver)
    assert str(failed.value) == "could not connect to two.example: connection refused"


@pytest.mark.parametrize(("response", "message"), [
    (httpx.Response(300, text="choose"), "unexpected upstream status 300"),
    (httpx.Response(400, text="bad"), "upstream answered 400"),
    (httpx.Response(302), "redirect (302) without a Location header"),
])
async def test_statuses_that_are_not_a_page(response: httpx.Response, message: str) -> None:
    with pytest.raises(FetchError) as failed:
        await fetch_url("http://s.example/", transport=_Recorder(default=response).transport,
                        resolver=_resolver({"s.example": [PUBLIC_IP]}))
    assert str(failed.value) == message


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_page_of_exactly_max_bytes_is_read(streamed: bool) -> None:
    body = b"z" * 1000

    class Chunks(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for start in range(0, len(body), 300):
                yield body[start:start + 300]

    response = (httpx.Response(200, headers={"Content-Type": "text/plain"}, stream=Chunks()) if streamed
                else httpx.Response(200, headers={"Content-Type": "text/plain"}, content=body))
    page = await fetch_url("http://m.example/", max_bytes=1000, transport=_Recorder(default=response).transport,
                           resolver=_resolver({"m.example": [PUBLIC_IP]}))
    assert page.text == body.decode()


@pytest.mark.parametrize("streamed", [False, True])
async def test_errors_name_the_page_without_its_query_or_fragment(streamed: bool) -> None:
    """A query string can carry a token: the error (logged, and shown to the caller) keeps scheme, host and path."""
    response = (httpx.Response(200, headers={"Content-Type": "text/plain"}, stream=_Endless()) if streamed
                else httpx.Response(200, headers={"Content-Type": "text/plain"}, text="x" * 5000))
    with pytest.raises(FetchError) as failed:
        await fetch_url("http://big.example/p?token=SECRET#part", max_bytes=1000,
                        transport=_Recorder(default=response).transport,
                        resolver=_resolver({"big.example": [PUBLIC_IP]}))
    assert str(failed.value).startswith("http://big.example/p is too large (")
    assert "SECRET" not in str(failed.value) and "part" not in str(failed.value)

    with pytest.raises(FetchError) as failed:
        await fetch_url("http://big.example/p?token=SECRET", timeout_s=0.1, transport=httpx.MockTransport(_slow),
                        resolver=_resolver({"big.example": [PUBLIC_IP]}))
    assert str(failed.value) == "timed out after 0.1s fetching http://big.example/p"


@pytest.mark.parametrize(("headers", "body"), [
    ({"Content-Type": "text/plain; charset=iso-8859-1"}, "Caf\xe9 cr\xe8me".encode("latin-1")),
    ({"Content-Type": "text/html"},
     b'<html><head><meta charset="iso-8859-1"><title>Caf\xe9</title></head>'
     b"<body><p>Caf\xe9 cr\xe8me</p></body></html>"),
    ({"Content-Type": "text/plain; charset=no-such-charset"}, "Caf\xe9 cr\xe8me".encode()),
    ({"Content-Type": "text/html; charset=no-such-charset"},  # an unknown name is skipped, not the end
     b'<meta charset="iso-8859-1"><title>Caf\xe9</title><p>Caf\xe9 cr\xe8me</p>'),
])
async def test_the_declared_charset_decodes_the_page(headers: dict[str, str], body: bytes) -> None:
    response = httpx.Response(200, headers=headers, content=body)
    page = await fetch_url("http://c.example/", transport=_Recorder(default=response).transport,
                           resolver=_resolver({"c.example": [PUBLIC_IP]}))
    assert "Caf\xe9 cr\xe8me" in page.text


async def test_an_environment_proxy_is_never_used(monkeypatch) -> None:
    """A proxy from the environment would carry the request somewhere the address check never saw."""
    contacted: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        contacted.append(await reader.readline())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nproxy")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    async with server:
        # No transport given: the real one, connecting to the checked public address directly (which, with no
        # network, fails or times out; the outcome does not matter, only where the request went).
        try:
            page = await fetch_url("http://env.example/", timeout_s=2, resolver=_resolver({"env.example": [PUBLIC_IP]}))
        except FetchError:
            page = None
    assert contacted == [] and (page is None or page.text != "proxy")


def test_the_fallback_tag_strip_when_trafilatura_fails(monkeypatch) -> None:
    import trafilatura

    def choke(*args, **kwargs):
        raise ValueError("odd markup")

    monkeypatch.setattr(trafilatura, "bare_extraction", choke)
    html = ("<html><head><title> Two   words </title><style>p { color: red }</style></head><body>"
            "<div>First <b>block</b></div><script>var x = 1;</script><noscript><svg><g>hidden</g></svg>also hidden"
            "</noscript><p>Second   block</p><ul><li>item one</li><li>item two</li></ul>tail</body></html>")
    title, text = html_to_text(html)
    assert title == "Two words"
    assert text == "First block\nSecond block\nitem one\nitem two\ntail"
    title, text = html_to_text("<p>before</p><title>Fish &amp; chips</title><p>one <i>two</i> three &lt;4&gt;</p>")
    assert (title, text) == ("Fish & chips", "before\none two three <4>")


@pytest.mark.parametrize("content_type", ["text/plain; charset=utf-8", "text/plain"])
async def test_bytes_that_are_not_the_charset_are_replaced_not_raised(content_type: str) -> None:
    response = httpx.Response(200, headers={"Content-Type": content_type}, content=b"ok \xff\xfe ok")
    page = await fetch_url("http://u.example/", transport=_Recorder(default=response).transport,
                           resolver=_resolver({"u.example": [PUBLIC_IP]}))
    assert page.text == "ok \ufffd\ufffd ok"


async def test_the_system_resolver_is_used_and_checked() -> None:
    """No resolver given: getaddrinfo answers, and "localhost" is loopback whatever it resolves to here."""
    recorder = _Recorder()
    with pytest.raises(UnsafeURLError, match=r"localhost resolves to: loopback address"):
        await fetch_url("http://localhost:8000/", transport=recorder.transport)
    assert recorder.requests == []


async def test_an_empty_text_page_is_titled_by_its_host() -> None:
    response = httpx.Response(200, headers={"Content-Type": "text/plain"}, content=b"  \n")
    page = await fetch_url("http://empty.example/", transport=_Recorder(default=response).transport,
                           resolver=_resolver({"empty.example": [PUBLIC_IP]}))
    assert (page.title, page.text) == ("empty.example", "")


async def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read() -> None:
    read: list[bytes] = []

    class Small(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            read.append(b"small")
            yield b"small"

    response = httpx.Response(200, headers={"Content-Type": "text/plain", "Content-Length": "5000"}, stream=Small())
    with pytest.raises(FetchError) as failed:
        await fetch_url("http://liar.example/", max_bytes=1000, transport=_Recorder(default=response).transport,
                        resolver=_resolver({"liar.example": [PUBLIC_IP]}))
    assert str(failed.value) == "http://liar.example/ is too large (5000 bytes > 1000)" and read == []


async def test_transport_failures_name_the_page_without_its_query() -> None:
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"half a page"
            raise httpx.ReadError("connection reset")

    def timing_out(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("read timed out", request=request)

    broken = _Recorder(default=httpx.Response(200, headers={"Content-Type": "text/plain"}, stream=Broken()))
    for transport, message in ((broken.transport, "fetching http://f.example/p failed: connection reset"),
                               (httpx.MockTransport(timing_out), "timed out fetching http://f.example/p")):
        with pytest.raises(FetchError) as failed:
            await fetch_url("http://f.example/p?key=SECRET", transport=transport,
                            resolver=_resolver({"f.example": [PUBLIC_IP]}))
        assert str(failed.value) == message
