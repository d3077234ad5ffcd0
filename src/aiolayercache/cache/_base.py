"""The cache protocols: ``Cache`` (ggcr's ``cache.Cache``, made async) and ``StoredSize``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .._hash import Hash
from .._protocols import Layer

__all__ = ["Cache", "CacheStats", "StoredSize"]


@runtime_checkable
class Cache(Protocol):
    """Where layers are kept. ``put`` may be lazy: use the layer it returns."""

    async def put(self, layer: Layer) -> Layer: ...
    async def get(self, h: Hash) -> Layer: ...
    async def delete(self, h: Hash) -> None: ...


@runtime_checkable
class StoredSize(Protocol):
    """A layer of a cache that knows how many bytes its entry holds, without reading it.

    :func:`prefetch` counts a hit's bytes by it: for an uncompressed entry,
    ``size()`` is the size of the gzip made of it on the fly, so asking would
    compress the whole entry. A cache whose layers lack it is counted by
    ``size()``.
    """

    async def stored_size(self) -> int:
        """The bytes of the entry, as stored."""
        ...


@dataclass(slots=True)
class CacheStats:
    """What a cache did since it was made: ``hits`` and ``misses`` of lookups (``get``),
    ``bytes_served`` from entries, ``bytes_written`` into committed entries,
    ``evictions`` (entries a bounded cache removed), ``write_errors`` (entries that
    could not be kept; their reads went on)."""

    hits: int = 0
    misses: int = 0
    bytes_served: int = 0
    bytes_written: int = 0
    evictions: int = 0
    write_errors: int = 0
