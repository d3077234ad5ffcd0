"""Changing images: :func:`to_oci` rewrites Docker schema 2 manifests with OCI media types.

The OCI layout reader of containers/image (skopeo 1.9, podman) only finds
OCI manifests and indexes in ``index.json``; ``skopeo copy docker://… oci:…``
converts for that reason, and so does ``to_oci`` (and ``layout.write(...,
oci=True)``, which uses it). Layer and config bytes are unchanged (a Docker
gzip layer is an OCI gzip layer); the manifest bytes, and so the image
digest, change.
"""

from __future__ import annotations

import json
from typing import Any, overload

from ._hash import Hash
from ._once import Once
from ._protocols import Image, ImageIndex, Layer
from ._types import IndexManifest, Manifest, MediaType, is_index_type
from ._wrap import ImageWrapper, IndexWrapper, LayerWrapper
from .partial import _nested_depth

__all__ = ["to_oci"]

_LAYER_TYPES = {
    MediaType.DOCKER_LAYER: MediaType.OCI_LAYER,
    MediaType.DOCKER_UNCOMPRESSED_LAYER: MediaType.OCI_UNCOMPRESSED_LAYER,
    MediaType.DOCKER_FOREIGN_LAYER: MediaType.OCI_RESTRICTED_LAYER,
}
_CONFIG_TYPES = {MediaType.DOCKER_CONFIG_JSON: MediaType.OCI_CONFIG_JSON}


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


class _Retyped(LayerWrapper):
    """A layer with another media type; everything else is the inner layer's."""

    def __init__(self, inner: Layer, media_type: str) -> None:
        super().__init__(inner)
        self._media_type = media_type

    async def media_type(self) -> str:
        return self._media_type


class _OCIImage(ImageWrapper):
    """An image with an OCI manifest: its layers retyped to match; config and bytes the same."""

    def __init__(self, inner: Image, raw: bytes) -> None:
        super().__init__(inner)
        self._raw = raw
        self._manifest = Manifest.parse(raw)

    async def media_type(self) -> str:
        return MediaType.OCI_MANIFEST_SCHEMA1

    async def raw_manifest(self) -> bytes:
        return self._raw

    async def manifest(self) -> Manifest:
        return self._manifest

    async def digest(self) -> Hash:
        return Hash.of(self._raw)

    async def size(self) -> int:
        return len(self._raw)

    async def layers(self) -> list[Layer]:
        out: list[Layer] = []
        for desc, layer in zip(self._manifest.layers, await self._inner.layers(), strict=True):
            out.append(_Retyped(layer, desc.media_type))
        return out

    async def layer_by_digest(self, h: Hash) -> Layer:
        layer = await self._inner.layer_by_digest(h)
        for d in self._manifest.layers:
            if d.digest == h:
                return _Retyped(layer, d.media_type)
        return layer

    async def layer_by_diff_id(self, h: Hash) -> Layer:
        layer = await self._inner.layer_by_diff_id(h)
        d = await layer.digest()
        for desc in self._manifest.layers:
            if desc.digest == d:
                return _Retyped(layer, desc.media_type)
        return layer


# Converted children by (digest, is an index), shared by a whole tree: each once.
_Memo = dict[tuple[Hash, bool], Any]


class _OCIIndex(IndexWrapper):
    """An OCI index whose children, recursively, are converted on the first ask for its bytes."""

    def __init__(self, inner: ImageIndex, depth: int = 0, memo: _Memo | None = None) -> None:
        super().__init__(inner)
        self._depth = depth
        self._memo: _Memo = {} if memo is None else memo
        self._raw: Once[bytes] = Once(self._convert)
        self._children: dict[Hash, Image | ImageIndex] = {}

    async def _build(self) -> bytes:
        return await self._raw.get()

    async def _convert(self) -> bytes:
        doc = json.loads(await self._inner.raw_manifest())
        doc["mediaType"] = str(MediaType.OCI_IMAGE_INDEX)
        for d in doc.get("manifests", []):
            h = Hash.parse(d["digest"])
            nested = is_index_type(d.get("mediaType"))
            child: Image | ImageIndex | None = self._memo.get((h, nested))
            if child is None:
                if nested:
                    depth = _nested_depth(self._depth, await self._inner.digest(), h)
                    inner = await self._inner.image_index(h)
                    child = _OCIIndex(inner, depth, self._memo)
                else:
                    child = await to_oci(await self._inner.image(h))
            new = await child.digest()  # an index builds here, before it is shared
            self._memo[h, nested] = child
            self._children[new] = child
            d["mediaType"] = await child.media_type()
            d["digest"] = str(new)
            d["size"] = await child.size()
        return _dump(doc)

    async def media_type(self) -> str:
        return MediaType.OCI_IMAGE_INDEX

    async def raw_manifest(self) -> bytes:
        return await self._build()

    async def index_manifest(self) -> IndexManifest:
        return IndexManifest.parse(await self._build())

    async def digest(self) -> Hash:
        return Hash.of(await self._build())

    async def size(self) -> int:
        return len(await self._build())

    async def image(self, h: Hash) -> Image:
        await self._build()
        child = self._children.get(h)
        if child is None or is_index_type(await child.media_type()):
            return await self._inner.image(h)
        return child  # type: ignore[return-value]

    async def image_index(self, h: Hash) -> ImageIndex:
        await self._build()
        child = self._children.get(h)
        if child is None or not is_index_type(await child.media_type()):
            return await self._inner.image_index(h)
        return child  # type: ignore[return-value]


@overload
async def to_oci(target: Image) -> Image: ...
@overload
async def to_oci(target: ImageIndex) -> ImageIndex: ...
async def to_oci(target: Image | ImageIndex) -> Image | ImageIndex:
    """``target`` with OCI media types, for an OCI layout that skopeo and umoci read.

    An image with a Docker schema 2 manifest gets an OCI manifest (config and
    layer media types mapped to their OCI names; the bytes of both are
    unchanged) and so a new digest; an OCI image is returned as it is. An
    index becomes an OCI index whose children, recursively, are converted
    (each distinct child once; nesting is capped as for any walk, see
    :data:`~aiolayercache._types.MAX_INDEX_DEPTH`) when it is first asked
    for its manifest or digest.

    ``await layout.write(d, await mutate.to_oci(img))`` is what
    ``layout.write(d, img, oci=True)`` does.
    """
    media_type = await target.media_type()
    if isinstance(target, ImageIndex) and not isinstance(target, Image):
        return _OCIIndex(target)  # even an OCI index may hold Docker manifests
    img: Image = target
    if media_type == MediaType.OCI_MANIFEST_SCHEMA1:
        return img
    doc = json.loads(await img.raw_manifest())
    doc["mediaType"] = str(MediaType.OCI_MANIFEST_SCHEMA1)
    cfg = doc.get("config", {})
    cfg["mediaType"] = str(_CONFIG_TYPES.get(cfg.get("mediaType"), cfg.get("mediaType")))
    for layer in doc.get("layers", []):
        mt = layer.get("mediaType")
        layer["mediaType"] = str(_LAYER_TYPES.get(mt, mt))
    return _OCIImage(img, _dump(doc))
