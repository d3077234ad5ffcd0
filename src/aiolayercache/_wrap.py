"""``LayerWrapper``: a layer that asks another for everything but what it overrides."""

from __future__ import annotations

from anyio.abc import ByteReceiveStream

from ._hash import Hash
from ._protocols import Layer

__all__ = ["LayerWrapper"]


class LayerWrapper:
    """Delegates every :class:`Layer` method to ``inner``; subclasses override some."""

    def __init__(self, inner: Layer) -> None:
        self._inner = inner

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
