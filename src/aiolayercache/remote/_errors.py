"""Errors of the remote package, read from error bodies, with URLs redacted.

``RemoteError`` carries the HTTP status, the registry's error codes and the
URL (without query string or user info); ``NET_ERRORS`` are the aiohttp and
socket failures the client retries and maps to :class:`TransportError`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import aiohttp
from yarl import URL

from .._errors import AioLayerCacheError
from ..streams import CHUNK_SIZE

__all__ = [
    "MAX_ERROR_BYTES",
    "NET_ERRORS",
    "RemoteError",
    "TransportError",
    "UnauthorizedError",
    "error_codes",
    "error_from_response",
    "read_capped",
    "redact",
]

MAX_ERROR_BYTES = 64 * 1024
NET_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError, OSError)


class RemoteError(AioLayerCacheError):
    """A registry request failed for good.

    ``status`` is the HTTP status (None when no response came), ``codes``
    the registry's error codes (``MANIFEST_UNKNOWN``, ``DENIED``, …), ``url``
    the request URL with any query string and user info removed. Never holds
    a credential.
    """

    def __init__(
        self,
        message: str,
        *,
        method: str = "GET",
        url: str = "",
        status: int | None = None,
        codes: Sequence[str] = (),
    ) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.codes = list(codes)
        parts = [f"{method} {url}:" if url else "", message]
        if status is not None:
            parts.append(f"(HTTP {status}{', ' + ', '.join(self.codes) if self.codes else ''})")
        super().__init__(" ".join(p for p in parts if p))


class UnauthorizedError(RemoteError):
    """The registry refused our credentials (or we had none): HTTP 401 or 403."""


class TransportError(RemoteError):
    """No usable response: connection refused, reset, timed out, after every retry."""


def redact(url: URL | str) -> str:
    """``url`` without user info and query string (presigned URLs carry secrets there)."""
    u = URL(str(url))
    if u.user or u.password:
        u = u.with_user(None)
    if u.query_string:
        return str(u.with_query(None)) + "?<redacted>"
    return str(u)


async def read_capped(resp: aiohttp.ClientResponse, cap: int, what: str) -> bytes:
    """The body of ``resp``, or a :class:`RemoteError` once it passes ``cap`` bytes."""
    if resp.content_length is not None and resp.content_length > cap:
        raise RemoteError(
            f"{what}: {resp.content_length} bytes is over the {cap}-byte cap",
            method=resp.method,
            url=redact(resp.url),
            status=resp.status,
        )
    buf = bytearray()
    while True:
        data = await resp.content.read(min(CHUNK_SIZE, cap + 1 - len(buf)))
        if not data:
            return bytes(buf)
        buf += data
        if len(buf) > cap:
            raise RemoteError(
                f"{what}: body is over the {cap}-byte cap",
                method=resp.method,
                url=redact(resp.url),
                status=resp.status,
            )


def error_codes(body: bytes) -> tuple[list[str], str]:
    """The registry's error codes and joined messages from a distribution error body."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        return [], ""
    codes, messages = [], []
    if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
        for e in doc["errors"][:20]:
            if isinstance(e, dict):
                if isinstance(e.get("code"), str):
                    codes.append(e["code"][:100])
                if isinstance(e.get("message"), str):
                    messages.append(e["message"][:300])
    return codes, "; ".join(messages)


async def error_from_response(resp: aiohttp.ClientResponse, message: str) -> RemoteError:
    """The typed error for a failed response, with the codes of its (capped) body."""
    try:
        body = await read_capped(resp, MAX_ERROR_BYTES, "error body")
    except (RemoteError, *NET_ERRORS):
        body = b""
    codes, detail = error_codes(body)
    cls = UnauthorizedError if resp.status in (401, 403) else RemoteError
    return cls(
        f"{message}{': ' + detail if detail else ''}",
        method=resp.method,
        url=redact(resp.url),
        status=resp.status,
        codes=codes,
    )
