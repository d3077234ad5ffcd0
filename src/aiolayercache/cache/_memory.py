"""``MemoryCache``: a real in-memory layer cache, bounded by size (least recently used goes)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from anyio.abc import ByteReceiveStream

from .. import partial
from .._errors import LayerNotFoundError
from .._hash import Hash
from .._protocols import Layer
from .._types import MediaType
from .._wrap import LayerWrapper
from ..streams import BytesStream, VerifyingStream, sniff
from ._base import CacheStats

__all__ = ["MemoryCache"]


@dataclass(slots=True)
class _Entry:
    data: bytes
    media_type: str | None
    compressed: bool  # filled from compressed(): served as is (a blob, a config)


class MemoryCache:
    """Layers held as bytes, at most ``max_bytes`` in all; verified before they are kept."""

    label = "memory"

    def __init__(self, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hash, _Entry] = OrderedDict()
        self._total = 0
        self._stats = CacheStats()

    def __repr__(self) -> str:
        return f"MemoryCache({len(self._entries)} entries, {self._total} bytes)"

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def total_bytes(self) -> int:
        return self._total

    def stats(self) -> CacheStats:
        """What this cache did since it was made (see :class:`CacheStats`)."""
        s = self._stats
        return CacheStats(s.hits, s.misses, s.bytes_served, s.bytes_written, s.evictions, 0)

    def _store(self, h: Hash, entry: _Entry) -> None:
        if len(entry.data) > self.max_bytes:
            return
        old = self._entries.pop(h, None)
        if old is not None:
            self._total -= len(old.data)
        self._entries[h] = entry
        self._total += len(entry.data)
        self._stats.bytes_written += len(entry.data)
        while self._total > self.max_bytes:
            _, gone = self._entries.popitem(last=False)
            self._total -= len(gone.data)
            self._stats.evictions += 1

    def _stream(
        self,
        h: Hash,
        size: int | None,
        media_type: str,
        open_upstream: Callable[[], Awaitable[ByteReceiveStream]],
        compressed: bool,
    ) -> Callable[[], Awaitable[ByteReceiveStream]]:
        async def open_() -> ByteReceiveStream:
            entry = self._entries.get(h)
            if entry is not None:
                self._entries.move_to_end(h)
                self._stats.bytes_served += len(entry.data)
                return BytesStream(entry.data)
            upstream = await open_upstream()
            sink = _MemSink(self, h, media_type, compressed)
            return VerifyingStream(upstream, h, size, sinks=[sink])

        return open_

    async def put(self, layer: Layer) -> Layer:
        return _MemTeeLayer(self, layer)

    async def get(self, h: Hash) -> Layer:
        entry = self._entries.get(h)
        if entry is None:
            self._stats.misses += 1
            raise LayerNotFoundError(f"{h} is not in {self!r}")
        self._stats.hits += 1
        self._entries.move_to_end(h)
        data = entry.data

        async def opener() -> ByteReceiveStream:
            self._stats.bytes_served += len(data)
            return BytesStream(data)

        kind = sniff(data[:512])
        if entry.compressed or kind in ("gzip", "zstd"):
            zstd = kind == "zstd"
            mt = entry.media_type or (MediaType.OCI_LAYER_ZSTD if zstd else MediaType.DOCKER_LAYER)
            return partial.compressed_layer(opener, digest=h, size=len(data), media_type=mt)
        return partial.uncompressed_layer(
            opener, diff_id=h, media_type=entry.media_type or MediaType.DOCKER_LAYER
        )

    async def delete(self, h: Hash) -> None:
        entry = self._entries.pop(h, None)
        if entry is None:
            raise LayerNotFoundError(f"{h} is not in {self!r}")
        self._total -= len(entry.data)


class _MemSink:
    def __init__(self, cache: MemoryCache, h: Hash, media_type: str, compressed: bool) -> None:
        self._compressed = compressed
        self._cache = cache
        self._h = h
        self._media_type = media_type
        self._parts: list[bytes] = []
        self._size = 0

    async def write(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self._cache.max_bytes:
            self._parts.append(chunk)
        else:
            self._parts = []

    async def commit(self) -> None:
        if self._size <= self._cache.max_bytes:
            self._cache._store(
                self._h, _Entry(b"".join(self._parts), self._media_type, self._compressed)
            )
        self._parts = []

    async def abort(self) -> None:
        self._parts = []


class _MemTeeLayer(LayerWrapper):
    def __init__(self, cache: MemoryCache, inner: Layer) -> None:
        super().__init__(inner)
        self._cache = cache

    async def compressed(self) -> ByteReceiveStream:
        h, size, mt = await self._inner.digest(), await self._inner.size(), await self.media_type()
        return await self._cache._stream(h, size, mt, self._inner.compressed, True)()

    async def uncompressed(self) -> ByteReceiveStream:
        h, mt = await self._inner.diff_id(), await self.media_type()
        return await self._cache._stream(h, None, mt, self._inner.uncompressed, False)()
