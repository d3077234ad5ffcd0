"""Random layers, images and indexes for tests and benchmarks (ggcr's ``random``).

Plain constructors returning objects with the async protocols. Each layer is
a compressed tar holding one file of ``byte_size`` random bytes, so digests,
diff_ids, config and manifests are all real and consistent.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from collections.abc import Sequence
from random import Random
from typing import NamedTuple

import zstandard
from anyio.abc import ByteReceiveStream

from . import partial
from ._errors import LayerNotFoundError
from ._hash import Hash
from ._protocols import Image, ImageIndex, Layer
from ._types import Descriptor, MediaType, Platform
from .streams import BytesStream

__all__ = ["image", "index", "index_of", "layer"]

_UNCOMPRESSED = {MediaType.OCI_UNCOMPRESSED_LAYER, MediaType.DOCKER_UNCOMPRESSED_LAYER}
_ZSTD = {MediaType.OCI_LAYER_ZSTD}


def _random_bytes(n: int, rng: Random | None) -> bytes:
    return rng.randbytes(n) if rng is not None else os.urandom(n)


def _tar_one_file(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _compress(tar: bytes, media_type: str) -> bytes:
    if media_type in _UNCOMPRESSED:
        return tar
    if media_type in _ZSTD:
        out: bytes = zstandard.ZstdCompressor(level=1).compress(tar)
        return out
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    return c.compress(tar) + c.flush()


class _Blobs:
    """Blobs and manifests held in memory, looked up by digest."""

    def __init__(self) -> None:
        self.blobs: dict[Hash, bytes] = {}
        self.manifests: dict[Hash, bytes] = {}

    def add(self, data: bytes) -> Hash:
        h = Hash.of(data)
        self.blobs[h] = data
        return h

    def merge(self, other: _Blobs) -> None:
        self.blobs.update(other.blobs)
        self.manifests.update(other.manifests)

    async def open_blob(self, desc: Descriptor) -> ByteReceiveStream:
        try:
            return BytesStream(self.blobs[desc.digest])
        except KeyError:
            raise LayerNotFoundError(f"no blob {desc.digest}") from None

    async def fetch_manifest(self, desc: Descriptor) -> bytes:
        try:
            return self.manifests[desc.digest]
        except KeyError:
            raise LayerNotFoundError(f"no manifest {desc.digest}") from None


class _Listing(NamedTuple):
    """What :func:`index_of` lists of a child it made: its manifest and media type."""

    raw: bytes
    media_type: str


def _make_layer(byte_size: int, media_type: str, rng: Random | None) -> tuple[bytes, Hash, Hash]:
    name = _random_bytes(8, rng).hex()
    tar = _tar_one_file(name, _random_bytes(byte_size, rng))
    blob = _compress(tar, media_type)
    return blob, Hash.of(blob), Hash.of(tar)


def layer(
    byte_size: int, media_type: str = MediaType.DOCKER_LAYER, *, seed: int | None = None
) -> Layer:
    """A layer: a tar of one file of ``byte_size`` random bytes, gzip'd (or per media type)."""
    blob, digest, diff_id = _make_layer(byte_size, media_type, Random(seed) if seed else None)

    async def opener() -> ByteReceiveStream:
        return BytesStream(blob)

    return partial.compressed_layer(
        opener, digest=digest, size=len(blob), media_type=media_type, diff_id=diff_id
    )


class _RandomImage(partial.ManifestImage):
    """What :func:`image` returns: an Image that keeps its blobs, for :func:`index_of`."""

    def __init__(self, raw: bytes, blobs: _Blobs, media_type: str) -> None:
        super().__init__(raw, blobs.open_blob, media_type=media_type)
        self._blobs = blobs
        self._listing = _Listing(raw, media_type)


def _build_image(
    byte_size: int,
    layers: int,
    media_type: str,
    layer_media_type: str | None,
    platform: Platform,
    rng: Random | None,
) -> tuple[bytes, _Blobs]:
    oci = media_type == MediaType.OCI_MANIFEST_SCHEMA1
    lmt = layer_media_type or (MediaType.OCI_LAYER if oci else MediaType.DOCKER_LAYER)
    blobs = _Blobs()
    descs, diff_ids, history = [], [], []
    for i in range(layers):
        blob, digest, diff_id = _make_layer(byte_size, lmt, rng)
        blobs.blobs[digest] = blob
        descs.append({"mediaType": str(lmt), "size": len(blob), "digest": str(digest)})
        diff_ids.append(str(diff_id))
        history.append({"created": "1970-01-01T00:00:00Z", "created_by": f"random layer {i}"})
    config: dict[str, object] = {
        "architecture": platform.architecture,
        "os": platform.os,
        "created": "1970-01-01T00:00:00Z",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    if platform.variant:
        config["variant"] = platform.variant
    raw_config = json.dumps(config, separators=(",", ":")).encode()
    config_digest = blobs.add(raw_config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": str(media_type),
        "config": {
            "mediaType": str(MediaType.OCI_CONFIG_JSON if oci else MediaType.DOCKER_CONFIG_JSON),
            "size": len(raw_config),
            "digest": str(config_digest),
        },
        "layers": descs,
    }
    return json.dumps(manifest, separators=(",", ":")).encode(), blobs


def image(
    byte_size: int,
    layers: int,
    *,
    media_type: str = MediaType.DOCKER_MANIFEST_SCHEMA2,
    layer_media_type: str | None = None,
    platform: Platform | str = "linux/amd64",
    seed: int | None = None,
) -> Image:
    """An image of ``layers`` random layers of ``byte_size`` bytes each."""
    plat = Platform.from_string(platform) if isinstance(platform, str) else platform
    rng = Random(seed) if seed is not None else None
    raw, blobs = _build_image(byte_size, layers, media_type, layer_media_type, plat, rng)
    return _RandomImage(raw, blobs, media_type)


class _RandomIndex(partial.ManifestIndex):
    """What :func:`index` returns: an ImageIndex that keeps its blobs, for :func:`index_of`."""

    def __init__(self, raw: bytes, blobs: _Blobs, media_type: str) -> None:
        super().__init__(raw, blobs.fetch_manifest, blobs.open_blob, media_type=media_type)
        self._blobs = blobs
        self._listing = _Listing(raw, media_type)


def index_of(
    children: Sequence[Image | ImageIndex],
    *,
    media_type: str = MediaType.OCI_IMAGE_INDEX,
    platforms: Sequence[Platform | str | None] | None = None,
) -> ImageIndex:
    """An index over children made by this module (images and indexes, nested freely)."""
    blobs = _Blobs()
    manifests = []
    for i, child in enumerate(children):
        if not isinstance(child, _RandomImage | _RandomIndex):
            raise TypeError("index_of takes images and indexes made by aiolayercache.random")
        blobs.merge(child._blobs)
        raw, mt = child._listing
        digest = Hash.of(raw)
        blobs.manifests[digest] = raw
        desc: dict[str, object] = {"mediaType": str(mt), "size": len(raw), "digest": str(digest)}
        plat = platforms[i] if platforms is not None else None
        if isinstance(plat, str):
            plat = Platform.from_string(plat)
        if plat is not None:
            desc["platform"] = json.loads(plat.to_json())
        manifests.append(desc)
    doc = {"schemaVersion": 2, "mediaType": str(media_type), "manifests": manifests}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return _RandomIndex(raw, blobs, media_type)


def index(
    byte_size: int,
    layers: int,
    count: int,
    *,
    media_type: str = MediaType.OCI_IMAGE_INDEX,
    platforms: Sequence[Platform | str] | None = None,
    seed: int | None = None,
) -> ImageIndex:
    """An index of ``count`` random images of ``layers`` layers of ``byte_size`` bytes.

    With ``platforms`` (one per child), each child's config and descriptor
    carry that platform.
    """
    if platforms is not None and len(platforms) != count:
        raise ValueError(f"{len(platforms)} platforms for {count} images")
    children = [
        image(
            byte_size,
            layers,
            media_type=MediaType.OCI_MANIFEST_SCHEMA1,
            platform=platforms[i] if platforms is not None else "linux/amd64",
            seed=None if seed is None else seed + i,
        )
        for i in range(count)
    ]
    return index_of(children, media_type=media_type, platforms=platforms)
