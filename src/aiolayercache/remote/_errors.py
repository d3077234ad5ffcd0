"""Errors of the remote package: they carry the HTTP status, registry codes and URL."""

from __future__ import annotations

from collections.abc import Sequence

from .._errors import AioLayerCacheError

__all__ = ["PlatformNotFoundError", "RemoteError", "TransportError", "UnauthorizedError"]


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


class PlatformNotFoundError(AioLayerCacheError, LookupError):
    """An index has no image for the asked platform; the message lists what it has."""
