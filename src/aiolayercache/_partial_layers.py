"""The layers of :mod:`aiolayercache.partial`: whole layers from an opener of their bytes.

Public through ``partial``; kept apart so each module stays small.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from anyio.abc import ByteReceiveStream

from ._hash import Hash
from ._once import Once
from ._types import Descriptor, MediaType
from .streams import BytesStream, GzipStream, decompress, hash_stream

__all__ = ["CompressedLayer", "ConfigLayer", "Opener", "UncompressedLayer"]

#: Opens a fresh stream of a blob's bytes (ggcr ``tarball.Opener``).
Opener = Callable[[], Awaitable[ByteReceiveStream]]


class CompressedLayer:
    """A :class:`~aiolayercache.Layer` from an opener of its compressed bytes and its descriptor.

    ``uncompressed()`` inflates by magic (gzip, zstd or plain tar). The
    diff_id is ``diff_id`` when given, else :meth:`compute_diff_id`'s, found on
    the first ask, once. Subclasses (a cached layer, a layer of a
    :class:`ManifestImage`) override :meth:`compute_diff_id` or the streams.

    :param opener: opens a fresh stream of the compressed bytes, per call
    :param digest: the digest of the compressed bytes
    :param size: their size in bytes
    :param media_type: the layer's media type
    :param diff_id: the digest of the uncompressed tar, when known
    """

    def __init__(
        self,
        opener: Opener,
        *,
        digest: Hash,
        size: int,
        media_type: str = MediaType.DOCKER_LAYER,
        diff_id: Hash | None = None,
    ) -> None:
        self._opener = opener
        self._digest = digest
        self._size = size
        self._media_type = media_type
        self._diff_id = Once(self.compute_diff_id, diff_id)

    def __repr__(self) -> str:
        return f"<layer {self._digest} {self._size} bytes>"

    async def digest(self) -> Hash:
        return self._digest

    async def size(self) -> int:
        return self._size

    async def media_type(self) -> str:
        return self._media_type

    async def diff_id(self) -> Hash:
        return await self._diff_id.get()

    async def compute_diff_id(self) -> Hash:
        """The diff_id when none was given: the hash of :meth:`uncompressed`.

        Called once, by the first :meth:`diff_id`; override to find it another way.
        """
        diff_id, _ = await hash_stream(await self.uncompressed())
        return diff_id

    async def compressed(self) -> ByteReceiveStream:
        return await self._opener()

    async def uncompressed(self) -> ByteReceiveStream:
        return await decompress(await self.compressed())


class UncompressedLayer:
    """A :class:`~aiolayercache.Layer` from an opener of its uncompressed tar, gzip'd on the fly.

    Digest and size are those of the gzip stream at ``level``, computed on
    the first ask, once; so is the diff_id when not given.

    :param opener: opens a fresh stream of the uncompressed tar, per call
    :param diff_id: the digest of the tar, when known
    :param media_type: the layer's media type
    :param level: the gzip level of ``compressed()``
    """

    def __init__(
        self,
        opener: Opener,
        *,
        diff_id: Hash | None = None,
        media_type: str = MediaType.DOCKER_LAYER,
        level: int = 1,
    ) -> None:
        self._opener = opener
        self._media_type = media_type
        self._level = level
        self._compressed = Once(self._hash_compressed)
        self._diff_id = Once(self._hash_uncompressed, diff_id)

    def __repr__(self) -> str:
        return f"<uncompressed layer {self._diff_id.peek()}>"

    async def _hash_compressed(self) -> tuple[Hash, int]:
        return await hash_stream(await self.compressed())

    async def _hash_uncompressed(self) -> Hash:
        diff_id, _ = await hash_stream(await self._opener())
        return diff_id

    async def digest(self) -> Hash:
        digest, _ = await self._compressed.get()
        return digest

    async def size(self) -> int:
        _, size = await self._compressed.get()
        return size

    async def media_type(self) -> str:
        return self._media_type

    async def diff_id(self) -> Hash:
        return await self._diff_id.get()

    async def compressed(self) -> ByteReceiveStream:
        return GzipStream(await self._opener(), self._level)

    async def uncompressed(self) -> ByteReceiveStream:
        return await self._opener()


class ConfigLayer:
    """An image's config blob seen as a layer (``layer_by_digest(config_name)``, as ggcr does).

    Both streams give the config's bytes; digest and diff_id are the descriptor's digest.

    :param raw: the config's bytes, or an async function that fetches them when read
    :param desc: the config's descriptor
    """

    def __init__(self, raw: bytes | Callable[[], Awaitable[bytes]], desc: Descriptor) -> None:
        self._raw = raw
        self._desc = desc

    def __repr__(self) -> str:
        return f"<config {self._desc.digest}>"

    async def _bytes(self) -> bytes:
        return self._raw if isinstance(self._raw, bytes) else await self._raw()

    async def digest(self) -> Hash:
        return self._desc.digest

    async def diff_id(self) -> Hash:
        return self._desc.digest

    async def size(self) -> int:
        return self._desc.size

    async def media_type(self) -> str:
        return self._desc.media_type

    async def compressed(self) -> ByteReceiveStream:
        return BytesStream(await self._bytes())

    async def uncompressed(self) -> ByteReceiveStream:
        return BytesStream(await self._bytes())
