"""What the blob stream and the remote descriptor call, declared apart from the client.

:class:`~aiolayercache.remote.Client` provides both; the pieces depend on
these protocols, not on the client, so no module imports back into
``_client``.
"""

from __future__ import annotations

from typing import Any, Protocol

import aiohttp
from anyio.abc import ByteReceiveStream
from yarl import URL

from .._hash import Hash
from .._types import Descriptor
from ._reference import Reference
from ._retry import RetryPolicy

__all__ = ["BlobSource", "Fetcher", "Sender"]


class BlobSource(Protocol):
    """Opens a blob's body from a byte offset; its retry policy paces resumes."""

    @property
    def retry(self) -> RetryPolicy: ...

    async def open_blob_response(
        self, ref: Reference, desc: Descriptor, offset: int
    ) -> aiohttp.ClientResponse:
        """The response to a GET of blob ``desc`` (a ``Range`` from ``offset`` when not 0).

        The status is 200 or 206; the caller owns (and must close) the response.
        """
        ...


class Fetcher(Protocol):
    """Fetches manifests and opens verified blob streams of one registry."""

    async def open_blob(self, ref: Reference, desc: Descriptor) -> ByteReceiveStream: ...

    async def fetch_manifest(
        self, ref: Reference, identifier: str, expect: Hash | None
    ) -> tuple[bytes, str, Hash]:
        """The raw manifest ``identifier`` (tag or digest) names, its media type and digest.

        Checked against ``expect`` when given.
        """
        ...


class Sender(Protocol):
    """Sends one registry API request with auth, retries and redirects (what a push needs)."""

    async def request(
        self,
        ref: Reference,
        method: str,
        path: str | URL,
        *,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
        what: str,
        scope: str | None = None,
        data: Any = None,
        resend: bool = True,
    ) -> aiohttp.ClientResponse:
        """The response, whose status is in ``ok`` (else a typed error); the caller closes it.

        ``path`` is a registry path or a URL the registry gave; ``scope`` the token
        scope; ``resend=False`` for a streamed body (sent once, never retried).
        """
        ...
