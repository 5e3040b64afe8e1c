"""SSRF-safe fetching of one web page, and HTML -> text.

The host is resolved here, every address is checked, and the connection goes to the checked
address (with the original Host header and TLS SNI), so a DNS answer that changes between
check and connect (rebinding) cannot redirect us to an internal service. Redirects are
followed by hand and every hop is checked again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from html.parser import HTMLParser

import httpx

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]

ALLOWED_SCHEMES = ("http", "https")
TEXT_CONTENT_TYPES = ("text/html", "text/plain", "application/xhtml+xml")
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# Hosts like "2130706433", "0x7f.1" or "127.1": ipaddress rejects them but libc resolves them to
# IPs; refusing them outright keeps the check independent of the resolver's quirks.
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+))*\.?$", re.IGNORECASE)
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([a-zA-Z0-9_.:-]+)""", re.IGNORECASE)
_USER_AGENT = "abloop-fetch/0.1 (+https://github.com/abloop)"


class UnsafeURLError(ValueError):
    """The URL may not be fetched: bad scheme, a non-public address, or too many redirects."""


class FetchError(RuntimeError):
    """The fetch itself failed: upstream error status, too large, timeout, not text."""


@dataclass(frozen=True)
class FetchedPage:
    url: str
    final_url: str
    content_type: str
    title: str
    text: str


async def fetch_url(
    url: str,
    *,
    max_bytes: int = 5_000_000,
    timeout_s: float = 10.0,
    max_redirects: int = 5,
    transport: httpx.AsyncBaseTransport | None = None,
    resolver: Resolver | None = None,
) -> FetchedPage:
    resolve = resolver or _getaddrinfo_resolver
    try:
        async with (
            asyncio.timeout(timeout_s),
            httpx.AsyncClient(
                transport=transport,
                follow_redirects=False,
                # Environment proxies would make the connection go somewhere we did not check.
                trust_env=False,
                timeout=httpx.Timeout(timeout_s),
                headers={"User-Agent": _USER_AGENT, "Accept": "text/html, text/plain;q=0.9, */*;q=0.1"},
            ) as client,
        ):
            current = _parse(url)
            for _hop in range(max_redirects + 1):
                addresses = await _checked_addresses(current, resolve)
                response = await _open(client, current, addresses)
                try:
                    location = _redirect_target(response)
                    if location is None:
                        content_type, body = await _read_body(response, max_bytes, current)
                        return _page(url, current, content_type, body, response)
                finally:
                    await response.aclose()
                current = _parse(location, base=current)
            raise UnsafeURLError(f"too many redirects (more than {max_redirects})")
    except TimeoutError as exc:
        raise FetchError(f"timed out after {timeout_s:g}s fetching {redact_url(url)}") from exc
    except httpx.TimeoutException as exc:
        raise FetchError(f"timed out fetching {redact_url(url)}") from exc
    except httpx.HTTPError as exc:
        raise FetchError(f"fetching {redact_url(url)} failed: {exc}") from exc


def html_to_text(html: str, url: str | None = None) -> tuple[str, str]:
    """(title, main text): trafilatura's main-content extraction, else a plain tag strip."""
    title, text = "", ""
    try:
        import trafilatura

        document = trafilatura.bare_extraction(
            html, url=url, with_metadata=True, include_comments=False, favor_recall=True
        )
        if document is not None:
            title = (document.title or "").strip()
            text = (document.text or "").strip()
    except Exception as exc:  # trafilatura can choke on odd markup; the fallback still works
        log.debug("trafilatura failed, falling back to tag strip: %s", exc)
    if not text or not title:
        fallback_title, fallback_text = _strip_tags(html)
        title = title or fallback_title
        text = text or fallback_text
    return title, text


def _parse(url: str, base: httpx.URL | None = None) -> httpx.URL:
    """`url` (a redirect's Location: relative to `base`) checked for what can be known before resolving it."""
    try:
        parsed = base.join(url) if base is not None else httpx.URL(url)
        # .host decodes an IDNA name, and a malformed A-label ("xn--") raises idna's error, a UnicodeError.
        host = parsed.host
    except (httpx.InvalidURL, TypeError, ValueError) as exc:  # UnicodeError is a ValueError
        raise UnsafeURLError(f"invalid URL: {exc}") from exc
    if parsed.scheme not in ALLOWED_SCHEMES:
        raise UnsafeURLError(f"scheme {parsed.scheme or '(none)'!r} not allowed; only http and https")
    if not host:
        raise UnsafeURLError("URL has no host")
    if parsed.userinfo:
        raise UnsafeURLError("credentials in the URL are not allowed")
    return parsed


async def _checked_addresses(url: httpx.URL, resolve: Resolver) -> list[str]:
    """Every address the host resolves to, each checked; refuse if any one is not public."""
    host = url.raw_host.decode("ascii")
    literal = _ip_or_none(host)
    if literal is not None:
        _check_address(literal, f"host {host}")
        return [str(literal)]
    if _NUMERIC_HOST.match(host):
        raise UnsafeURLError(f"host {host!r} is a non-canonical numeric address")
    _check_host_name(host)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        answers = await resolve(host, port)
    except UnicodeError as exc:  # the resolver's IDNA codec refuses a label the check above let through
        raise UnsafeURLError(f"host {host[:80]!r} is not a valid host name: {exc}") from exc
    except OSError as exc:
        raise FetchError(f"could not resolve {host}: {exc}") from exc
    if not answers:
        raise FetchError(f"could not resolve {host}: no addresses")
    addresses: list[str] = []
    for answer in answers:
        ip = _ip_or_none(answer)
        if ip is None:
            raise UnsafeURLError(f"{host} resolved to something that is not an IP address: {answer!r}")
        _check_address(ip, f"{host} resolves to")
        if str(ip) not in addresses:
            addresses.append(str(ip))
    return addresses


def _check_host_name(host: str) -> None:
    """DNS's own limits (RFC 1035): the resolver would refuse such a name with a codec error, not an OSError."""
    name = host.removesuffix(".")  # the root's dot is not part of the name's length
    labels = name.split(".")
    if len(name) > 253 or any(not 1 <= len(label) <= 63 for label in labels):
        raise UnsafeURLError(f"host {host[:80]!r} is not a valid host name (empty label, a label over 63 "
                             "characters or a name over 253)")


def _ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        # A zone id ("fe80::1%eth0") says nothing about the address class.
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def _check_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, subject: str) -> None:
    effective: ipaddress.IPv4Address | ipaddress.IPv6Address = ip
    if isinstance(ip, ipaddress.IPv6Address):
        # ::ffff:a.b.c.d and 2002:a.b.c.d::/48 reach the embedded IPv4 host.
        effective = ip.ipv4_mapped or ip.sixtofour or ip
    reason = _forbidden_class(effective)
    if reason is not None:
        shown = f"{effective} (as {ip})" if effective != ip else str(ip)
        raise UnsafeURLError(f"{subject}: {reason} address {shown}; only public addresses may be fetched")


def _forbidden_class(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        # fec0::/10, deprecated (RFC 3879) but still routed inside some networks; ipaddress counts it global.
        ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        # Catches what the named classes miss, e.g. 100.64.0.0/10 (carrier-grade NAT).
        ("non-global", not ip.is_global),
    )
    return next((name for name, hit in checks if hit), None)


async def _getaddrinfo_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def _open(client: httpx.AsyncClient, url: httpx.URL, addresses: list[str]) -> httpx.Response:
    """GET `url` from the first checked address that accepts a connection."""
    last_error: httpx.TransportError | None = None
    for address in addresses:
        request = client.build_request(
            "GET",
            httpx.URL(scheme=url.scheme, host=address, port=url.port, raw_path=url.raw_path),
            headers={"Host": url.netloc.decode("ascii")},
            # TLS must verify the certificate for the name, not for the IP we connect to.
            extensions={"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {},
        )
        try:
            return await client.send(request, stream=True)
        except httpx.TimeoutException:
            raise
        except httpx.TransportError as exc:
            last_error = exc
            log.info("fetch from %s (%s) failed: %s", redact_url(str(url)), address, exc)
        except (httpx.InvalidURL, UnicodeError) as exc:
            # No HTTPError: httpx builds a redirect's next request even when it does not follow it, and raises
            # these on a Location it cannot make a URL of ("http:\\x", a malformed IDNA name).
            raise FetchError(f"{redact_url(str(url))} redirects to an invalid URL ({exc})") from exc
    raise FetchError(f"could not connect to {url.host}: {last_error}")


def _redirect_target(response: httpx.Response) -> str | None:
    if response.status_code in _REDIRECT_STATUSES:
        location = response.headers.get("Location")
        if not location:
            raise FetchError(f"redirect ({response.status_code}) without a Location header")
        return location
    if response.status_code >= 400:
        raise FetchError(f"upstream answered {response.status_code}")
    if not 200 <= response.status_code < 300:
        raise FetchError(f"unexpected upstream status {response.status_code}")
    return None


async def _read_body(response: httpx.Response, max_bytes: int, url: httpx.URL) -> tuple[str, bytes]:
    content_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if content_type not in TEXT_CONTENT_TYPES:
        raise FetchError(f"content type {content_type or '(none)'!r} is not text/html or text/plain")
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(f"{redact_url(str(url))} is too large ({declared} bytes > {max_bytes})")
    body = bytearray()
    # Decoded bytes are counted, so a small gzip bomb cannot blow past the limit either.
    async for piece in response.aiter_bytes():
        body.extend(piece)
        if len(body) > max_bytes:
            raise FetchError(f"{redact_url(str(url))} is too large (more than {max_bytes} bytes)")
    return content_type, bytes(body)


def _page(original: str, final: httpx.URL, content_type: str, body: bytes, response: httpx.Response) -> FetchedPage:
    text = _decode(body, response.charset_encoding, sniff_html=content_type in _HTML_TYPES)
    if content_type in _HTML_TYPES:
        title, text = html_to_text(text, str(final))
    else:
        text = text.strip()
        title = _first_line(text) or final.host
    return FetchedPage(url=original, final_url=str(final), content_type=content_type, title=title, text=text)


def _decode(body: bytes, declared: str | None, *, sniff_html: bool) -> str:
    candidates = [declared]
    if sniff_html:
        match = _META_CHARSET.search(body[:4096])
        candidates.append(match.group(1).decode("ascii") if match else None)
    for encoding in candidates:
        if not encoding:
            continue
        try:
            return body.decode(encoding, errors="replace")
        except LookupError:  # an unknown charset name
            continue
    return body.decode("utf-8", errors="replace")


def _first_line(text: str, limit: int = 120) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:limit]
    return ""


def redact_url(url: str) -> str:
    """scheme://host[:port]/path: query strings and credentials can carry secrets (for errors and log lines)."""
    try:
        parsed = httpx.URL(url)
    except Exception:
        return "(unparseable URL)"
    return str(parsed.copy_with(query=None, fragment=None, userinfo=b""))


class _TagStripper(HTMLParser):
    _SKIP = frozenset({"script", "style", "noscript", "template", "head", "svg"})
    _BLOCK = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title_parts: list[str] = []
        self.text_parts: list[str] = []
        self._skip_depth = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in self._SKIP:
            self._skip_depth += 1
        elif tag in self._BLOCK:
            self.text_parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in self._SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in self._BLOCK:
            self.text_parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title_parts.append(data)
        elif not self._skip_depth:
            self.text_parts.append(data)


def _strip_tags(html: str) -> tuple[str, str]:
    parser = _TagStripper()
    try:
        parser.feed(html)
        parser.close()
    except Exception as exc:  # html.parser is lenient, but never let the fallback raise
        log.debug("tag strip failed: %s", exc)
    title = " ".join("".join(parser.title_parts).split())
    lines = (" ".join(line.split()) for line in "".join(parser.text_parts).splitlines())
    return title, "\n".join(line for line in lines if line)
