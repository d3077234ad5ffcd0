"""The layers a filesystem cache hands out: one that fills it, and ones served from entries.

They depend on :class:`Entries`, the little they need of the cache (fill an
entry, open a committed one, remember a diff_id), not on the cache class.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Protocol

from anyio.abc import ByteReceiveStream

from .. import partial
from .._errors import LayerNotFoundError
from .._hash import Hash
from .._protocols import Layer
from .._types import MediaType
from .._wrap import LayerWrapper
from ._proofs import Meta

__all__ = ["Entries", "TeeLayer", "cached_layer"]


class Entries(Protocol):
    """What the layers of a cache ask of it."""

    async def fill(
        self,
        h: Hash,
        open_upstream: Callable[[], Awaitable[ByteReceiveStream]],
        size: int | None,
        info: dict[str, str],
    ) -> ByteReceiveStream:
        """A stream of entry ``h``: the committed file, or upstream teed into the entry."""
        ...

    async def open_committed(self, h: Hash) -> ByteReceiveStream | None:
        """A verified stream of the committed entry ``h``; None when there is none."""
        ...

    async def remember(self, h: Hash, meta: Meta) -> None:
        """Keep what is now known of entry ``h`` (a diff_id computed from it)."""
        ...


class TeeLayer(LayerWrapper):
    """What ``FilesystemCache.put`` returns: streams served from, or filling, the cache."""

    def __init__(self, entries: Entries, inner: Layer) -> None:
        super().__init__(inner)
        self._entries = entries

    def __repr__(self) -> str:
        return f"<cached {self._inner!r} in {self._entries!r}>"

    async def compressed(self) -> ByteReceiveStream:
        h = await self._inner.digest()
        size = await self._inner.size()
        info = {"digest": str(h), "media_type": str(await self._inner.media_type())}
        return await self._entries.fill(h, self._inner.compressed, size, info)

    async def uncompressed(self) -> ByteReceiveStream:
        h = await self._inner.diff_id()
        info = {"diff_id": str(h), "media_type": str(await self._inner.media_type())}
        return await self._entries.fill(h, self._inner.uncompressed, None, info)


class _EntryOpener:
    def __init__(self, entries: Entries, h: Hash) -> None:
        self._entries = entries
        self._h = h

    async def __call__(self) -> ByteReceiveStream:
        stream = await self._entries.open_committed(self._h)
        if stream is not None:
            return stream
        raise LayerNotFoundError(f"{self._h} is no longer in {self._entries!r}")


class _CachedCompressed(partial.CompressedLayer):
    """A layer served from a compressed (gzip / zstd) entry, keyed by digest."""

    def __init__(self, entries: Entries, h: Hash, meta: Meta) -> None:
        mt = meta.media_type or (
            MediaType.OCI_LAYER_ZSTD if meta.kind == "zstd" else MediaType.DOCKER_LAYER
        )
        diff_id = Hash.parse(meta.diff_id) if meta.diff_id else None
        super().__init__(
            _EntryOpener(entries, h), digest=h, size=meta.size, media_type=mt, diff_id=diff_id
        )
        self._entries = entries
        self._h = h
        self._meta = meta

    async def stored_size(self) -> int:
        """The bytes of the entry (a ``cache.StoredSize``)."""
        return self._meta.size

    async def compute_diff_id(self) -> Hash:
        # Hashed from the entry once: kept with it, so it is never hashed again.
        out = await super().compute_diff_id()
        await self._entries.remember(self._h, replace(self._meta, diff_id=str(out)))
        return out


class _CachedUncompressed(partial.UncompressedLayer):
    """A layer served from an uncompressed tar entry, keyed by diff_id; gzip'd on the fly."""

    def __init__(self, entries: Entries, h: Hash, meta: Meta) -> None:
        mt = meta.media_type or MediaType.DOCKER_LAYER
        super().__init__(_EntryOpener(entries, h), diff_id=h, media_type=mt, level=1)
        self._stored_size = meta.size

    async def stored_size(self) -> int:
        """The bytes of the tar entry, not of the gzip made of it (a ``cache.StoredSize``)."""
        return self._stored_size


def cached_layer(entries: Entries, h: Hash, meta: Meta) -> Layer:
    """The layer of entry ``h``: compressed, or a tar keyed by diff_id (gzip'd on the fly)."""
    if meta.kind == "tar" and meta.digest != str(h):
        return _CachedUncompressed(entries, h, meta)
    return _CachedCompressed(entries, h, meta)
