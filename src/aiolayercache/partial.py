"""Build full layers, images and indexes from the little each source knows.

In the spirit of go-containerregistry's ``partial`` package: a source that
can open a compressed blob gets a whole :class:`Layer` from
:func:`compressed_layer`; one that only has the uncompressed tar uses
:func:`uncompressed_layer`; one that has a raw manifest and a way to open
blobs gets a whole :class:`Image` from :func:`image`, and an index from
:func:`index`. Derived values (a diff_id never stated, the digest of a layer
compressed on the fly) are computed lazily, once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from anyio.abc import ByteReceiveStream

from ._errors import ChildNotFoundError, DigestMismatchError, LayerNotFoundError, ManifestError
from ._hash import Hash
from ._once import Once
from ._protocols import Image, ImageIndex, Layer
from ._types import (
    MAX_DOCUMENT_BYTES,
    MAX_INDEX_DEPTH,
    ConfigFile,
    Descriptor,
    IndexManifest,
    Manifest,
    MediaType,
    is_image_type,
    is_index_type,
)
from .streams import BytesStream, GzipStream, VerifyingStream, decompress, hash_stream, read_all

__all__ = [
    "BlobOpener",
    "ManifestFetcher",
    "Opener",
    "compressed_layer",
    "image",
    "index",
    "uncompressed_layer",
]

Opener = Callable[[], Awaitable[ByteReceiveStream]]
BlobOpener = Callable[[Descriptor], Awaitable[ByteReceiveStream]]
ManifestFetcher = Callable[[Descriptor], Awaitable[bytes]]


class _CompressedLayer:
    """A Layer from an opener of its compressed bytes plus what the manifest says."""

    def __init__(
        self,
        opener: Opener,
        digest: Hash,
        size: int,
        media_type: str,
        diff_id: Hash | None,
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


class _UncompressedLayer:
    """A Layer from an opener of its uncompressed tar; compressed with gzip on the fly."""

    def __init__(self, opener: Opener, diff_id: Hash | None, media_type: str, level: int) -> None:
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


def compressed_layer(
    opener: Opener,
    *,
    digest: Hash,
    size: int,
    media_type: str = MediaType.DOCKER_LAYER,
    diff_id: Hash | None = None,
) -> Layer:
    """A full Layer from an opener of the compressed bytes (gzip, zstd or plain tar).

    ``uncompressed()`` inflates by magic; ``diff_id()`` is computed on first
    use when not given.
    """
    return _CompressedLayer(opener, digest, size, media_type, diff_id)


def uncompressed_layer(
    opener: Opener,
    *,
    diff_id: Hash | None = None,
    media_type: str = MediaType.DOCKER_LAYER,
    level: int = 1,
) -> Layer:
    """A full Layer from an opener of the uncompressed tar, gzip'd on the fly."""
    return _UncompressedLayer(opener, diff_id, media_type, level)


class _ConfigLayer:
    """The config blob seen as a layer (``layer_by_digest(config_name)``, as ggcr does).

    ``raw`` is the config's bytes, or an async function that fetches them when read.
    """

    def __init__(self, raw: bytes | Callable[[], Awaitable[bytes]], desc: Descriptor) -> None:
        self._raw = raw
        self._desc = desc

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


class _PartialImage:
    """An Image from its raw manifest and a way to open blobs."""

    def __init__(
        self,
        raw_manifest: bytes,
        open_blob: BlobOpener,
        raw_config: bytes | None,
        media_type: str | None,
    ) -> None:
        self._raw = bytes(raw_manifest)
        self._manifest = Manifest.parse(self._raw)
        self._digest = Hash.of(self._raw)
        self._open_blob = open_blob
        self._raw_config = Once(self._fetch_config, raw_config)
        mt = media_type or self._manifest.media_type or MediaType.OCI_MANIFEST_SCHEMA1
        self._media_type = mt
        self._layers: list[Layer] | None = None
        self._config: ConfigFile | None = None

    def __repr__(self) -> str:
        return f"<image {self._digest}>"

    async def media_type(self) -> str:
        return self._media_type

    async def size(self) -> int:
        return len(self._raw)

    async def digest(self) -> Hash:
        return self._digest

    async def raw_manifest(self) -> bytes:
        return self._raw

    async def manifest(self) -> Manifest:
        return self._manifest

    async def config_name(self) -> Hash:
        return self._manifest.config.digest

    async def raw_config_file(self) -> bytes:
        return await self._raw_config.get()

    async def _fetch_config(self) -> bytes:
        desc = self._manifest.config
        if desc.size > MAX_DOCUMENT_BYTES:
            raise ManifestError(
                f"config {desc.digest}: {desc.size} bytes is over the {MAX_DOCUMENT_BYTES} cap"
            )
        if desc.data is not None:
            stream: ByteReceiveStream = BytesStream(desc.data)
        else:
            stream = await self._open_blob(desc)
        verified = VerifyingStream(stream, desc.digest, desc.size, what=f"config {desc.digest}")
        return await read_all(verified)

    async def config_file(self) -> ConfigFile:
        if self._config is None:
            self._config = ConfigFile.parse(await self.raw_config_file())
        return self._config

    async def layers(self) -> list[Layer]:
        if self._layers is None:
            descs = self._manifest.layers
            diff_ids: list[Hash] = []
            if descs:
                diff_ids = (await self.config_file()).rootfs.diff_ids
            known = len(diff_ids) == len(descs)
            self._layers = [
                _CompressedLayer(
                    self._opener(d), d.digest, d.size, d.media_type, diff_ids[i] if known else None
                )
                for i, d in enumerate(descs)
            ]
        return self._layers

    def _opener(self, desc: Descriptor) -> Opener:
        async def open_() -> ByteReceiveStream:
            return await self._open_blob(desc)

        return open_

    async def layer_by_digest(self, h: Hash) -> Layer:
        if h == self._manifest.config.digest:
            return _ConfigLayer(await self.raw_config_file(), self._manifest.config)
        for i, d in enumerate(self._manifest.layers):
            if d.digest == h:
                if self._layers is not None:
                    return self._layers[i]
                # Without reading the config: its diff_id is looked up only if asked for.
                return _IndexedLayer(self, i, self._opener(d), d)
        raise LayerNotFoundError(f"image {self._digest} has no layer with digest {h}")

    async def layer_by_diff_id(self, h: Hash) -> Layer:
        diff_ids = (await self.config_file()).rootfs.diff_ids
        layers = await self.layers()
        for i, d in enumerate(diff_ids):
            if d == h and i < len(layers):
                return layers[i]
        raise LayerNotFoundError(f"image {self._digest} has no layer with diff_id {h}")


class _IndexedLayer(_CompressedLayer):
    """Layer ``i`` of an image, made before the config is read; diff_id comes from it."""

    def __init__(self, img: _PartialImage, i: int, opener: Opener, desc: Descriptor) -> None:
        super().__init__(opener, desc.digest, desc.size, desc.media_type, None)
        self._img = img
        self._i = i

    async def compute_diff_id(self) -> Hash:
        ids = (await self._img.config_file()).rootfs.diff_ids
        if len(ids) == len((await self._img.manifest()).layers):
            return ids[self._i]
        return await super().compute_diff_id()


def image(
    raw_manifest: bytes,
    open_blob: BlobOpener,
    *,
    raw_config: bytes | None = None,
    media_type: str | None = None,
) -> Image:
    """A full Image from a raw manifest and ``open_blob(descriptor)``.

    The config is read through ``open_blob`` (verified, capped) unless
    ``raw_config`` is given. ``media_type`` defaults to the manifest's own.
    Raises :class:`ManifestError` at once if the manifest does not parse.
    """
    return _PartialImage(raw_manifest, open_blob, raw_config, media_type)


def _nested_depth(depth: int, parent: object, child: Hash) -> int:
    """The depth of index ``child`` of ``parent`` (at ``depth``), or a ManifestError past the cap.

    The one check of :data:`MAX_INDEX_DEPTH`: every walk over an index tree
    (reading, validating, prefetching, writing, converting) calls it before
    it opens a nested index, so a deep tree is a typed error, never a
    ``RecursionError``.
    """
    if depth >= MAX_INDEX_DEPTH:
        raise ManifestError(
            f"index {child} (child of index {parent}) is nested {depth + 1} levels deep, "
            f"over the cap of {MAX_INDEX_DEPTH}"
        )
    return depth + 1


class _PartialIndex:
    """An ImageIndex from its raw manifest, a manifest fetcher and a blob opener.

    ``depth`` counts the indexes above this one since the index first read.
    """

    def __init__(
        self,
        raw_manifest: bytes,
        fetch_manifest: ManifestFetcher,
        open_blob: BlobOpener,
        media_type: str | None,
        depth: int = 0,
    ) -> None:
        self._depth = depth
        self._raw = bytes(raw_manifest)
        self._manifest = IndexManifest.parse(self._raw)
        self._digest = Hash.of(self._raw)
        self._fetch = fetch_manifest
        self._open_blob = open_blob
        self._media_type = media_type or self._manifest.media_type or MediaType.OCI_IMAGE_INDEX

    def __repr__(self) -> str:
        return f"<index {self._digest}>"

    async def media_type(self) -> str:
        return self._media_type

    async def digest(self) -> Hash:
        return self._digest

    async def size(self) -> int:
        return len(self._raw)

    async def raw_manifest(self) -> bytes:
        return self._raw

    async def index_manifest(self) -> IndexManifest:
        return self._manifest

    async def _child(self, h: Hash) -> tuple[Descriptor, bytes]:
        for d in self._manifest.manifests:
            if d.digest == h:
                break
        else:
            raise ChildNotFoundError(f"index {self._digest} has no child {h}")
        raw = d.data if d.data is not None else await self._fetch(d)
        hasher = h.hasher()
        hasher.update(raw)
        actual = Hash(h.algorithm, hasher.hexdigest())
        if actual != h:
            raise DigestMismatchError(f"manifest {h} (child of index {self._digest})", h, actual)
        return d, raw

    async def image(self, h: Hash) -> Image:
        d, raw = await self._child(h)
        if is_index_type(d.media_type):
            raise ManifestError(f"child {h} of index {self._digest} is an index, not an image")
        mt = d.media_type if is_image_type(d.media_type) else None
        return _PartialImage(raw, self._open_blob, None, mt)

    async def image_index(self, h: Hash) -> ImageIndex:
        depth = _nested_depth(self._depth, self._digest, h)
        d, raw = await self._child(h)
        if is_image_type(d.media_type):
            raise ManifestError(f"child {h} of index {self._digest} is an image, not an index")
        mt = d.media_type if is_index_type(d.media_type) else None
        return _PartialIndex(raw, self._fetch, self._open_blob, mt, depth)


def index(
    raw_manifest: bytes,
    fetch_manifest: ManifestFetcher,
    open_blob: BlobOpener,
    *,
    media_type: str | None = None,
) -> ImageIndex:
    """A full ImageIndex from a raw index, ``fetch_manifest(descriptor)`` and ``open_blob``.

    Child manifests are checked against their digest before they are parsed;
    ``image_index`` raises :class:`ManifestError` for an index nested more than
    :data:`~aiolayercache._types.MAX_INDEX_DEPTH` levels below this one.
    """
    return _PartialIndex(raw_manifest, fetch_manifest, open_blob, media_type)
