from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import ByteReceiveStream

from aiolayercache import Descriptor, Hash, Image, Manifest, partial
from aiolayercache.streams import ChunkStream


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class SlowStream(ChunkStream):
    """Bytes in small chunks with a yield between them, so other tasks interleave."""

    def __init__(self, data: bytes, chunk: int = 64 * 1024, fail_at: int | None = None) -> None:
        super().__init__()
        self._data = data
        self._pos = 0
        self._chunk = chunk
        self._fail_at = fail_at
        self.closed = False

    async def _next(self) -> bytes | None:
        await anyio.lowlevel.checkpoint()
        if self._fail_at is not None and self._pos >= self._fail_at:
            raise ConnectionResetError("injected failure mid-stream")
        if self._pos >= len(self._data):
            return None
        out = self._data[self._pos : self._pos + self._chunk]
        self._pos += len(out)
        return out

    async def _aclose(self) -> None:
        self.closed = True


class Source:
    """A counting in-memory source for one image: every blob open is counted."""

    def __init__(self, img: Image) -> None:
        self.blobs: dict[Hash, bytes] = dict(img._blobs.blobs)  # type: ignore[attr-defined]
        self.raw: bytes = img._raw  # type: ignore[attr-defined]
        self.opens: Counter[Hash] = Counter()
        self.corrupt: set[Hash] = set()
        self.fail_once: set[Hash] = set()
        self.streams: list[SlowStream] = []

    async def open_blob(self, desc: Descriptor) -> ByteReceiveStream:
        self.opens[desc.digest] += 1
        data = self.blobs[desc.digest]
        fail_at = None
        if desc.digest in self.fail_once:
            self.fail_once.discard(desc.digest)
            fail_at = len(data) // 2
        if desc.digest in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        s = SlowStream(data, fail_at=fail_at)
        self.streams.append(s)
        return s

    def image(self) -> Image:
        config = Manifest.parse(self.raw).config.digest
        return partial.image(self.raw, self.open_blob, raw_config=self.blobs[config])

    @property
    def layer_opens(self) -> int:
        return sum(self.opens.values())


def entries(d: Path) -> list[str]:
    """Committed cache entries (files named like a digest) in ``d``."""
    return sorted(n for n in os.listdir(d) if n.startswith("sha256:"))


def temps(d: Path) -> list[str]:
    t = d / ".aiolayercache" / "tmp"
    return sorted(os.listdir(t)) if t.exists() else []
