"""Wrappers: a layer, image or index that asks another for everything it does not override.

Go embeds a struct to inherit its methods; here each wrapper forwards every
protocol method to ``inner`` explicitly (typed, visible to a type checker,
no ``__getattr__``), and a subclass overrides only what it changes: the
cached image its layers, the observed layer its stream, the converted image
its manifest.
"""

from __future__ import annotations

from anyio.abc import ByteReceiveStream

from ._hash import Hash
from ._protocols import Image, ImageIndex, Layer
from ._types import ConfigFile, IndexManifest, Manifest

__all__ = ["ImageWrapper", "IndexWrapper", "LayerWrapper"]


class LayerWrapper:
    """Delegates every :class:`Layer` method to ``inner``; subclasses override some."""

    def __init__(self, inner: Layer) -> None:
        self._inner = inner

    @property
    def inner(self) -> Layer:
        """The wrapped layer."""
        return self._inner

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self._inner!r}>"

    async def digest(self) -> Hash:
        return await self._inner.digest()

    async def diff_id(self) -> Hash:
        return await self._inner.diff_id()

    async def size(self) -> int:
        return await self._inner.size()

    async def media_type(self) -> str:
        return await self._inner.media_type()

    async def compressed(self) -> ByteReceiveStream:
        return await self._inner.compressed()

    async def uncompressed(self) -> ByteReceiveStream:
        return await self._inner.uncompressed()


class ImageWrapper:
    """Delegates every :class:`Image` method to ``inner``; subclasses override some."""

    def __init__(self, inner: Image) -> None:
        self._inner = inner

    @property
    def inner(self) -> Image:
        """The wrapped image."""
        return self._inner

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self._inner!r}>"

    async def layers(self) -> list[Layer]:
        return await self._inner.layers()

    async def media_type(self) -> str:
        return await self._inner.media_type()

    async def size(self) -> int:
        return await self._inner.size()

    async def config_name(self) -> Hash:
        return await self._inner.config_name()

    async def config_file(self) -> ConfigFile:
        return await self._inner.config_file()

    async def raw_config_file(self) -> bytes:
        return await self._inner.raw_config_file()

    async def digest(self) -> Hash:
        return await self._inner.digest()

    async def manifest(self) -> Manifest:
        return await self._inner.manifest()

    async def raw_manifest(self) -> bytes:
        return await self._inner.raw_manifest()

    async def layer_by_digest(self, h: Hash) -> Layer:
        return await self._inner.layer_by_digest(h)

    async def layer_by_diff_id(self, h: Hash) -> Layer:
        return await self._inner.layer_by_diff_id(h)


class IndexWrapper:
    """Delegates every :class:`ImageIndex` method to ``inner``; subclasses override some."""

    def __init__(self, inner: ImageIndex) -> None:
        self._inner = inner

    @property
    def inner(self) -> ImageIndex:
        """The wrapped index."""
        return self._inner

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self._inner!r}>"

    async def media_type(self) -> str:
        return await self._inner.media_type()

    async def digest(self) -> Hash:
        return await self._inner.digest()

    async def size(self) -> int:
        return await self._inner.size()

    async def index_manifest(self) -> IndexManifest:
        return await self._inner.index_manifest()

    async def raw_manifest(self) -> bytes:
        return await self._inner.raw_manifest()

    async def image(self, h: Hash) -> Image:
        return await self._inner.image(h)

    async def image_index(self, h: Hash) -> ImageIndex:
        return await self._inner.image_index(h)
