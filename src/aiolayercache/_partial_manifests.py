"""The images and indexes of :mod:`aiolayercache.partial`: whole ones from a raw manifest.

Public through ``partial``; kept apart so each module stays small.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from anyio.abc import ByteReceiveStream

from ._errors import ChildNotFoundError, DigestMismatchError, LayerNotFoundError, ManifestError
from ._hash import Hash
from ._once import Once
from ._partial_layers import CompressedLayer, ConfigLayer, Opener
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
from .streams import BytesStream, VerifyingStream, read_all

__all__ = ["BlobOpener", "ManifestFetcher", "ManifestImage", "ManifestIndex"]

#: Opens a fresh stream of the blob a descriptor names.
BlobOpener = Callable[[Descriptor], Awaitable[ByteReceiveStream]]
#: Fetches the raw bytes of the manifest a descriptor names.
ManifestFetcher = Callable[[Descriptor], Awaitable[bytes]]


class ManifestImage:
    """An :class:`~aiolayercache.Image` from its raw manifest and a way to open blobs.

    What ggcr's ``partial.CompressedToImage`` derives from a compressed image
    core: digest and size from the raw manifest, the config read through
    ``open_blob`` (verified, capped) on the first ask unless ``raw_config`` is
    given, and a :class:`CompressedLayer` per manifest layer. Sources
    subclass it to carry what they know besides (``tarball.TarballImage``
    its tags).

    :param raw_manifest: the manifest's bytes
    :param open_blob: opens a fresh stream of the blob a descriptor names
    :param raw_config: the config's bytes, when already known
    :param media_type: the image's media type; by default the manifest's own
    :raises ManifestError: the manifest does not parse
    """

    def __init__(
        self,
        raw_manifest: bytes,
        open_blob: BlobOpener,
        *,
        raw_config: bytes | None = None,
        media_type: str | None = None,
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
                CompressedLayer(
                    self._opener(d),
                    digest=d.digest,
                    size=d.size,
                    media_type=d.media_type,
                    diff_id=diff_ids[i] if known else None,
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
            return ConfigLayer(await self.raw_config_file(), self._manifest.config)
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


class _IndexedLayer(CompressedLayer):
    """Layer ``i`` of an image, made before the config is read; diff_id comes from it."""

    def __init__(self, img: ManifestImage, i: int, opener: Opener, desc: Descriptor) -> None:
        super().__init__(opener, digest=desc.digest, size=desc.size, media_type=desc.media_type)
        self._img = img
        self._i = i

    async def compute_diff_id(self) -> Hash:
        ids = (await self._img.config_file()).rootfs.diff_ids
        if len(ids) == len((await self._img.manifest()).layers):
            return ids[self._i]
        return await super().compute_diff_id()


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


class ManifestIndex:
    """An :class:`~aiolayercache.ImageIndex` from its raw manifest, a fetcher and a blob opener.

    Child manifests are fetched with ``fetch_manifest`` (or taken from the
    descriptor's ``data``) and checked against their digest before they are
    parsed; children are :class:`ManifestImage` and :class:`ManifestIndex`.

    :param raw_manifest: the index's bytes
    :param fetch_manifest: fetches the raw manifest a descriptor names
    :param open_blob: opens a fresh stream of the blob a descriptor names
    :param media_type: the index's media type; by default the index's own
    :param depth: how many indexes lie above this one since the walk began;
        ``image_index`` refuses a child deeper than
        :data:`~aiolayercache._types.MAX_INDEX_DEPTH`
    :raises ManifestError: the index does not parse
    """

    def __init__(
        self,
        raw_manifest: bytes,
        fetch_manifest: ManifestFetcher,
        open_blob: BlobOpener,
        *,
        media_type: str | None = None,
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
        return ManifestImage(raw, self._open_blob, media_type=mt)

    async def image_index(self, h: Hash) -> ImageIndex:
        depth = _nested_depth(self._depth, self._digest, h)
        d, raw = await self._child(h)
        if is_image_type(d.media_type):
            raise ManifestError(f"child {h} of index {self._digest} is an image, not an index")
        mt = d.media_type if is_index_type(d.media_type) else None
        return ManifestIndex(raw, self._fetch, self._open_blob, media_type=mt, depth=depth)
