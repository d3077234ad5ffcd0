"""Layer caches: the async port of go-containerregistry's ``pkg/v1/cache``, made better.

``image(img, c)`` and ``image_index(ii, c)`` wrap sources so their layers are
read from ``c`` when present and written to it as they are read otherwise;
``prefetch`` warms a cache with a whole image or index tree in parallel.
:class:`FilesystemCache` keeps ggcr's on-disk format, verifies every byte
before an entry gets its name, commits atomically and fetches each entry once
however many tasks want it; :class:`MemoryCache` holds bytes in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
from anyio.abc import ByteReceiveStream

from .._errors import DigestMismatchError, LayerNotFoundError
from .._hash import Hash
from .._protocols import Image, ImageIndex, Layer
from .._types import (
    MAX_DOCUMENT_BYTES,
    ConfigFile,
    Descriptor,
    is_index_type,
)
from .._wrap import ImageWrapper, IndexWrapper, LayerWrapper
from ..partial import ConfigLayer, _nested_depth
from ..streams import drain, read_all
from ._base import Cache, CacheStats, StoredSize
from ._fs import EntryInfo, FilesystemCache, VerifyReport
from ._memory import MemoryCache
from ._tiered import Counted, Labelled, TieredCache, TierHit, tiered

__all__ = [
    "Cache",
    "CacheStats",
    "Counted",
    "EntryInfo",
    "FilesystemCache",
    "Labelled",
    "LayerNotFoundError",
    "MemoryCache",
    "PrefetchStats",
    "StoredSize",
    "TierHit",
    "TieredCache",
    "VerifyReport",
    "image",
    "image_index",
    "prefetch",
    "read_only",
    "tiered",
]


class _LazyLayer(LayerWrapper):
    """A layer of a cached image: each stream is looked up in the cache first."""

    def __init__(self, inner: Layer, c: Cache) -> None:
        super().__init__(inner)
        self._c = c

    def __repr__(self) -> str:
        return f"<lazily cached {self._inner!r}>"

    async def compressed(self) -> ByteReceiveStream:
        try:
            return await (await self._c.get(await self._inner.digest())).compressed()
        except LayerNotFoundError:
            pass
        return await (await self._c.put(self._inner)).compressed()

    async def uncompressed(self) -> ByteReceiveStream:
        try:
            return await (await self._c.get(await self._inner.diff_id())).uncompressed()
        except LayerNotFoundError:
            pass
        return await (await self._c.put(self._inner)).uncompressed()


class _CachedImage(ImageWrapper):
    """An image whose layers and config are read through a cache (ggcr ``cache.Image``)."""

    def __init__(self, inner: Image, c: Cache) -> None:
        super().__init__(inner)
        self._c = c
        self._raw_config: bytes | None = None
        self._config: ConfigFile | None = None

    def __repr__(self) -> str:
        return f"<{self._inner!r} through {self._c!r}>"

    async def layers(self) -> list[Layer]:
        # From manifest and (cached) config alone, so a warm image reads no blob upstream.
        descs = (await self._inner.manifest()).layers
        diff_ids = (await self.config_file()).rootfs.diff_ids
        if len(descs) == len(diff_ids):
            return [
                _LazyLayer(_DescribedLayer(self._inner, d, i), self._c)
                for d, i in zip(descs, diff_ids, strict=True)
            ]
        return [_LazyLayer(x, self._c) for x in await self._inner.layers()]

    async def raw_config_file(self) -> bytes:
        # The config is a blob too: kept in the cache, so a warm pull fetches no blob.
        if self._raw_config is None:
            desc = (await self._inner.manifest()).config
            try:
                hit = await self._c.get(desc.digest)
                self._raw_config = await read_all(await hit.compressed(), MAX_DOCUMENT_BYTES)
            except (LayerNotFoundError, DigestMismatchError):
                # Not cached, or an entry that rotted since its proof (it was removed when
                # its bytes failed; nobody saw them, they were read whole first).
                # Fetched inside the cache's fill, so one task or process fetches it and
                # the others read what it committed (single-flight, as for layers).
                put = await self._c.put(ConfigLayer(self._inner.raw_config_file, desc))
                self._raw_config = await read_all(await put.compressed(), MAX_DOCUMENT_BYTES)
        return self._raw_config

    async def config_file(self) -> ConfigFile:
        if self._config is None:
            self._config = ConfigFile.parse(await self.raw_config_file())
        return self._config

    async def _described(self, *, digest: Hash | None, diff_id: Hash | None) -> Layer | None:
        """A lazily cached layer known from manifest and config alone, if they name it."""
        descs = (await self._inner.manifest()).layers
        diff_ids = (await self.config_file()).rootfs.diff_ids
        if len(descs) != len(diff_ids):
            return None
        for desc, d in zip(descs, diff_ids, strict=True):
            if desc.digest == digest or d == diff_id:
                return _LazyLayer(_DescribedLayer(self._inner, desc, d), self._c)
        return None

    async def layer_by_digest(self, h: Hash) -> Layer:
        # Answered from metadata: the wrapped image is asked only on a cache miss.
        found = await self._described(digest=h, diff_id=None)
        if found is not None:
            return found
        try:
            return await self._c.get(h)
        except LayerNotFoundError:
            pass
        return await self._c.put(await self._inner.layer_by_digest(h))

    async def layer_by_diff_id(self, h: Hash) -> Layer:
        found = await self._described(digest=None, diff_id=h)
        if found is not None:
            return found
        return await self._c.put(await self._inner.layer_by_diff_id(h))


class _DescribedLayer:
    """A layer of ``img`` described by its descriptor and diff_id; opened only when read."""

    def __init__(self, img: Image, desc: Descriptor, diff_id: Hash) -> None:
        self._img = img
        self._desc = desc
        self._diff_id = diff_id

    async def digest(self) -> Hash:
        return self._desc.digest

    async def diff_id(self) -> Hash:
        return self._diff_id

    async def size(self) -> int:
        return self._desc.size

    async def media_type(self) -> str:
        return self._desc.media_type

    async def compressed(self) -> ByteReceiveStream:
        return await (await self._img.layer_by_digest(self._desc.digest)).compressed()

    async def uncompressed(self) -> ByteReceiveStream:
        return await (await self._img.layer_by_digest(self._desc.digest)).uncompressed()


class _CachedIndex(IndexWrapper):
    """An index whose children, recursively, are read through a cache."""

    def __init__(self, inner: ImageIndex, c: Cache) -> None:
        super().__init__(inner)
        self._c = c

    def __repr__(self) -> str:
        return f"<{self._inner!r} through {self._c!r}>"

    async def image(self, h: Hash) -> Image:
        return image(await self._inner.image(h), self._c)

    async def image_index(self, h: Hash) -> ImageIndex:
        return image_index(await self._inner.image_index(h), self._c)


def image(img: Image, c: Cache) -> Image:
    """``img`` whose layers are read from ``c`` when there, and written to it as read otherwise."""
    return _CachedImage(img, c)


def image_index(ii: ImageIndex, c: Cache) -> ImageIndex:
    """``ii`` whose children (images and indexes, recursively) are wrapped with :func:`image`."""
    return _CachedIndex(ii, c)


class _ReadOnly:
    def __init__(self, c: Cache) -> None:
        self._c = c

    def __repr__(self) -> str:
        return f"read_only({self._c!r})"

    async def put(self, layer: Layer) -> Layer:
        return layer

    async def get(self, h: Hash) -> Layer:
        return await self._c.get(h)

    async def delete(self, h: Hash) -> None:
        return None


def read_only(c: Cache) -> Cache:
    """``c`` that is only read: ``put`` returns the layer unchanged and ``delete`` does nothing."""
    return _ReadOnly(c)


@dataclass(slots=True)
class PrefetchStats:
    """What :func:`prefetch` did: distinct layers, hits and misses, and bytes on each side."""

    layers: int = 0
    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    bytes_from_cache: int = 0
    #: hits by the tier that had them ("local", "fleet"), when ``c`` is :func:`tiered`
    hits_by_tier: dict[str, int] = field(default_factory=dict)


async def prefetch(
    target: Image | ImageIndex,
    c: Cache,
    *,
    concurrency: int = 8,
    uncompressed: bool = False,
) -> PrefetchStats:
    """Read every distinct layer of ``target`` (an image, or an index tree) through ``c`` once.

    Child manifests and layers are worked on in parallel tasks, at most
    ``concurrency`` at a time. A layer already in ``c`` counts as a hit and is
    not read again; a miss is read to its end through ``c`` (so it is cached
    and verified). With ``uncompressed=True`` layers are keyed and read by
    diff_id. Each distinct manifest is walked once however often the tree
    lists it, and an index nested more than
    :data:`~aiolayercache._types.MAX_INDEX_DEPTH` levels below ``target`` is a
    :class:`ManifestError`. Errors of any task propagate in an
    ``ExceptionGroup`` (the others are cancelled).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    stats = PrefetchStats()
    limiter = anyio.CapacityLimiter(concurrency)
    seen_layers: set[Hash] = set()
    seen_manifests: set[Hash] = set()

    async def fetch_layer(layer: Layer | tuple[Image, Hash]) -> None:
        async with limiter:
            if isinstance(layer, tuple):
                # Known from the manifest: the image is asked for the layer only on a miss.
                h = layer[1]
            else:
                h = await (layer.diff_id() if uncompressed else layer.digest())
            if h in seen_layers:
                return
            seen_layers.add(h)
            stats.layers += 1
            try:
                hit = await c.get(h)
            except LayerNotFoundError:
                pass
            else:
                stats.hits += 1
                if isinstance(hit, TierHit):
                    stats.hits_by_tier[hit.tier] = stats.hits_by_tier.get(hit.tier, 0) + 1
                    if hit.promotes:
                        # From a slower tier: read it through, so the faster ones fill.
                        n = await drain(
                            await (hit.uncompressed() if uncompressed else hit.compressed())
                        )
                        stats.bytes_from_cache += n
                        return
                size = await (hit.stored_size() if isinstance(hit, StoredSize) else hit.size())
                stats.bytes_from_cache += size  # not `+= await`: that loses updates
                return
            stats.misses += 1
            if isinstance(layer, tuple):
                layer = await layer[0].layer_by_digest(h)
            put = await c.put(layer)
            stream = await (put.uncompressed() if uncompressed else put.compressed())
            n = await drain(stream)
            stats.bytes_fetched += n

    async def walk_image(tg: anyio.abc.TaskGroup, img: Image) -> None:
        if not uncompressed:
            # Digests are in the manifest: no need to read the config to list layers.
            for desc in (await img.manifest()).layers:
                tg.start_soon(fetch_layer, (img, desc.digest))
            return
        async with limiter:
            layers = await img.layers()
        for layer in layers:
            tg.start_soon(fetch_layer, layer)

    async def walk_index(tg: anyio.abc.TaskGroup, ii: ImageIndex, depth: int) -> None:
        async with limiter:
            im = await ii.index_manifest()
            parent = await ii.digest()
        for desc in im.manifests:
            if desc.digest in seen_manifests:
                continue
            seen_manifests.add(desc.digest)
            nested = is_index_type(desc.media_type)
            child_depth = _nested_depth(depth, parent, desc.digest) if nested else depth
            tg.start_soon(walk_child, tg, ii, desc.digest, nested, child_depth)

    async def walk_child(
        tg: anyio.abc.TaskGroup, ii: ImageIndex, h: Hash, nested: bool, depth: int
    ) -> None:
        if nested:
            async with limiter:
                child_ii = await ii.image_index(h)
            await walk_index(tg, child_ii, depth)
        else:
            async with limiter:
                child = await ii.image(h)
            await walk_image(tg, child)

    async with anyio.create_task_group() as tg:
        if isinstance(target, ImageIndex) and not isinstance(target, Image):
            await walk_index(tg, target, 0)
        else:
            await walk_image(tg, target)
    return stats
