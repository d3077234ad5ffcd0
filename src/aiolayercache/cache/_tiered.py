"""``tiered``: caches ordered fastest first, read through as one.

``get`` asks each tier in turn; a hit in a slower tier comes back as a layer
whose streams fill the faster tiers as they are read (the faster tiers'
``put`` wrapped around the hit). ``put`` wraps the source in every tier's
``put``, slowest innermost, so one read of the source fills them all (and a
faster tier that already has the entry serves it without reading further).
``delete`` deletes from every tier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .._errors import LayerNotFoundError
from .._hash import Hash
from .._protocols import Layer
from .._wrap import LayerWrapper
from ._base import Cache, CacheStats, StoredSize

__all__ = ["Counted", "Labelled", "TierHit", "TieredCache", "label_of", "tiered"]


@runtime_checkable
class Counted(Protocol):
    """A cache that counts what it did (``stats()``); every cache of this library does."""

    def stats(self) -> CacheStats: ...


@runtime_checkable
class Labelled(Protocol):
    """A cache that says which tier it is in summaries ("local", "memory", "fleet")."""

    label: str


def label_of(c: object) -> str:
    return c.label if isinstance(c, Labelled) else type(c).__name__


class TierHit(LayerWrapper):
    """What a tiered cache's ``get`` returns: the hit, and the tier it came from.

    ``promotes`` is true when the hit came from a slower tier: reading the
    layer fills the faster ones (``prefetch`` reads such a hit through).
    """

    def __init__(self, inner: Layer, tier: str, promotes: bool, stored: int | None) -> None:
        super().__init__(inner)
        self.tier = tier
        self.promotes = promotes
        self._stored = stored

    def __repr__(self) -> str:
        return f"<{self._inner!r} from the {self.tier} tier>"

    async def stored_size(self) -> int:
        """The entry's bytes as its tier stores them (a ``cache.StoredSize``)."""
        return self._stored if self._stored is not None else await self._inner.size()


class TieredCache:
    """Caches ordered fastest first, read through as one (made by :func:`tiered`)."""

    def __init__(self, tiers: Sequence[Cache]) -> None:
        self.tiers = tuple(tiers)
        self.label = "+".join(label_of(c) for c in self.tiers)
        self._hits = 0
        self._misses = 0

    def stats(self) -> CacheStats:
        """Hits and misses of this cache's lookups (a hit in any tier is a hit); bytes,
        evictions and write errors summed over the tiers that count them."""
        out = CacheStats(self._hits, self._misses)
        for c in self.tiers:
            if isinstance(c, Counted):
                t = c.stats()
                out.bytes_served += t.bytes_served
                out.bytes_written += t.bytes_written
                out.evictions += t.evictions
                out.write_errors += t.write_errors
        return out

    def __repr__(self) -> str:
        return f"tiered({', '.join(repr(c) for c in self.tiers)})"

    async def get(self, h: Hash) -> Layer:
        for i, c in enumerate(self.tiers):
            try:
                hit = await c.get(h)
            except LayerNotFoundError:
                continue
            self._hits += 1
            stored = await _stored_size(hit)
            if i == 0:
                return TierHit(hit, label_of(c), False, stored)
            filling = hit
            for faster in reversed(self.tiers[:i]):
                filling = await faster.put(filling)
            return TierHit(filling, label_of(c), True, stored)
        self._misses += 1
        raise LayerNotFoundError(f"{h} is in no tier of {self!r}")

    async def put(self, layer: Layer) -> Layer:
        for c in reversed(self.tiers):
            layer = await c.put(layer)
        return layer

    async def delete(self, h: Hash) -> None:
        found = False
        for c in self.tiers:
            try:
                await c.delete(h)
                found = True
            except LayerNotFoundError:
                pass
        if not found:
            raise LayerNotFoundError(f"{h} is in no tier of {self!r}")


async def _stored_size(layer: Layer) -> int | None:
    return await layer.stored_size() if isinstance(layer, StoredSize) else None


def tiered(first: Cache, *rest: Cache) -> TieredCache:
    """One cache over ``first, *rest``, ordered fastest first (see the module)."""
    return TieredCache((first, *rest))
