"""Build full layers, images and indexes from the little each source knows.

In the spirit of go-containerregistry's ``partial`` package: a source that
can open a compressed blob gets a whole :class:`Layer` from
:func:`compressed_layer`; one that only has the uncompressed tar uses
:func:`uncompressed_layer`; one that has a raw manifest and a way to open
blobs gets a whole :class:`Image` from :func:`image`, and an index from
:func:`index`. Derived values (a diff_id never stated, the digest of a layer
compressed on the fly) are computed lazily, once.

The classes behind those functions are the extension points, public as
ggcr's ``partial`` is: subclass :class:`CompressedLayer`,
:class:`UncompressedLayer`, :class:`ManifestImage` or :class:`ManifestIndex`
to serve bytes from elsewhere or carry more (the filesystem cache's layers,
``random``'s images, ``tarball.TarballImage``), overriding only what
changes (:meth:`CompressedLayer.compute_diff_id`, a stream).
:class:`ConfigLayer` is an image's config seen as a layer.
"""

from __future__ import annotations

from ._hash import Hash
from ._partial_layers import CompressedLayer, ConfigLayer, Opener, UncompressedLayer
from ._partial_manifests import (
    BlobOpener,
    ManifestFetcher,
    ManifestImage,
    ManifestIndex,
)
from ._partial_manifests import _nested_depth as _nested_depth  # for the walks of other modules
from ._protocols import Image, ImageIndex, Layer
from ._types import MediaType

__all__ = [
    "BlobOpener",
    "CompressedLayer",
    "ConfigLayer",
    "ManifestFetcher",
    "ManifestImage",
    "ManifestIndex",
    "Opener",
    "UncompressedLayer",
    "compressed_layer",
    "image",
    "index",
    "uncompressed_layer",
]

# Shown (in reprs, docs, pickles) where they are public.
for _cls in (CompressedLayer, ConfigLayer, ManifestImage, ManifestIndex, UncompressedLayer):
    _cls.__module__ = __name__
del _cls


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
    use when not given. A :class:`CompressedLayer`.
    """
    return CompressedLayer(opener, digest=digest, size=size, media_type=media_type, diff_id=diff_id)


def uncompressed_layer(
    opener: Opener,
    *,
    diff_id: Hash | None = None,
    media_type: str = MediaType.DOCKER_LAYER,
    level: int = 1,
) -> Layer:
    """A full Layer from an opener of the uncompressed tar, gzip'd on the fly.

    An :class:`UncompressedLayer`.
    """
    return UncompressedLayer(opener, diff_id=diff_id, media_type=media_type, level=level)


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
    A :class:`ManifestImage`.
    """
    return ManifestImage(raw_manifest, open_blob, raw_config=raw_config, media_type=media_type)


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
    A :class:`ManifestIndex`.
    """
    return ManifestIndex(raw_manifest, fetch_manifest, open_blob, media_type=media_type)
