"""Bounded fetches of issuer documents through the injected HTTP client.

An issuer's server is outside the broker's control, so each fetch is bounded: redirects are never
followed (a redirect could point anywhere, including inside our network), compressed bodies are
refused (a small gzip body can inflate a thousandfold), the body is capped while it streams in,
and the whole fetch has a deadline, not just each read (a server trickling one byte per second
would otherwise hold a worker for ever). The body must be strict JSON (see :mod:`broker.oidc.jose`).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from broker.oidc.jose import MalformedInput, strict_json

#: Discovery documents and key sets are a few KiB; anything near this is not one.
MAX_DOCUMENT_BYTES = 256 * 1024


class FetchFailed(Exception):
    """An issuer document could not be fetched or is unusable; the message is for operators."""


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin(url: str) -> str:
    """``host:port`` of a URL (lower-case host, explicit default port), for comparing origins."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.hostname or ''}:{port or default}"


def check_fetch_url(url: str, *, allow_http_loopback: bool) -> str:
    """The URL's ``host:port`` when the broker may fetch from it: https, or loopback http in dev."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        parts.port  # noqa: B018  # raises on a malformed port
    except ValueError:
        host = ""
    if not host or parts.username is not None or parts.password is not None or parts.fragment:
        raise FetchFailed(f"refusing to fetch {url[:200]!r}: not a plain absolute URL")
    if parts.scheme == "https" or (
        parts.scheme == "http" and allow_http_loopback and is_loopback_host(host)
    ):
        return origin(url)
    raise FetchFailed(f"refusing to fetch {url[:200]!r}: only https (or loopback http in dev mode)")


def fetch_json(
    http: httpx.Client,
    url: str,
    *,
    timeout: float,
    max_bytes: int = MAX_DOCUMENT_BYTES,
    monotonic: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """GET ``url`` and parse a JSON object from it, within ``timeout`` seconds in all."""
    deadline = monotonic() + timeout
    try:
        with http.stream(
            "GET",
            url,
            follow_redirects=False,
            timeout=httpx.Timeout(timeout),
            headers={"Accept": "application/json", "Accept-Encoding": "identity"},
        ) as response:
            if response.status_code != 200:
                raise FetchFailed(f"{url}: HTTP {response.status_code}")
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in {"", "identity"}:
                raise FetchFailed(f"{url}: refusing Content-Encoding {encoding[:32]!r}")
            length = response.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > max_bytes):
                raise FetchFailed(f"{url}: Content-Length {length[:32]!r} over {max_bytes}")
            body = bytearray()
            for chunk in response.iter_raw():
                body += chunk
                if len(body) > max_bytes:
                    raise FetchFailed(f"{url}: body over {max_bytes} bytes")
                if monotonic() > deadline:
                    raise FetchFailed(f"{url}: no complete answer within {timeout} s")
    except httpx.HTTPError as exc:
        raise FetchFailed(f"{url}: {type(exc).__name__}") from None
    try:
        value = strict_json(bytes(body))
    except MalformedInput as exc:
        raise FetchFailed(f"{url}: {exc}") from None
    if not isinstance(value, dict):
        raise FetchFailed(f"{url}: not a JSON object")
    return value
