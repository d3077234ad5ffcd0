"""Compressed streams: gzip and zstd, inflated and deflated chunk by chunk, and ``sniff``.

Inflating and deflating big chunks runs in worker threads (``_cpu``), so the
event loop stays responsive and the second core works while the loop reads.
"""

from __future__ import annotations

import zlib
from typing import Literal

import zstandard
from anyio import EndOfStream
from anyio.abc import ByteReceiveStream

from ._chunks import CHUNK_SIZE, ChunkStream, PrefixedStream, _cpu
from ._errors import DecompressionError

__all__ = [
    "GZIP_MAGIC",
    "ZSTD_MAGIC",
    "GunzipStream",
    "GzipStream",
    "ZstdDecompressStream",
    "decompress",
    "sniff",
]

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Kind = Literal["gzip", "zstd", "tar", "blob"]


def sniff(head: bytes) -> Kind:
    """What a blob is, from its first bytes: ``gzip``, ``zstd``, ``tar`` (ustar magic at
    257, so 262 bytes are needed to tell) or ``blob`` (anything else, e.g. a config)."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head[257:262] == b"ustar":
        return "tar"
    return "blob"


class GunzipStream(ChunkStream):
    """Inflate a gzip stream (one or several members) chunk by chunk."""

    def __init__(self, inner: ByteReceiveStream) -> None:
        super().__init__()
        self._inner = inner
        self._d = zlib.decompressobj(wbits=31)
        self._in = b""
        self._fed = False

    async def _next(self) -> bytes | None:
        while True:
            if self._in:
                data, self._in = self._in, b""
            else:
                try:
                    data = await self._inner.receive(CHUNK_SIZE)
                except EndOfStream:
                    if self._fed and not self._d.eof:
                        raise DecompressionError("gzip stream ends before its end") from None
                    return None
                if self._d.eof:
                    # Bytes after a finished member: another member, or padding.
                    self._d = zlib.decompressobj(wbits=31)
            if self._d.eof and not data.strip(b"\0"):
                continue
            self._fed = True
            try:
                out: bytes = await _cpu(self._d.decompress, data, CHUNK_SIZE)
            except zlib.error as exc:
                raise DecompressionError(f"corrupt gzip stream: {exc}") from exc
            self._in = self._d.unconsumed_tail
            if self._d.eof and self._d.unused_data:
                rest = self._d.unused_data
                if rest.strip(b"\0"):
                    self._d = zlib.decompressobj(wbits=31)
                    self._in = rest
            if out:
                return out

    async def _aclose(self) -> None:
        await self._inner.aclose()


class ZstdDecompressStream(ChunkStream):
    """Decompress a zstd stream (one or several frames) chunk by chunk."""

    _SLICE = 128 * 1024  # bounds the output of one call on very compressible data

    def __init__(self, inner: ByteReceiveStream) -> None:
        super().__init__()
        self._inner = inner
        self._dctx = zstandard.ZstdDecompressor()
        self._d = self._dctx.decompressobj()
        self._in = b""
        self._fed = False

    async def _next(self) -> bytes | None:
        while True:
            if not self._in:
                try:
                    self._in = await self._inner.receive(CHUNK_SIZE)
                except EndOfStream:
                    if self._fed and not self._d.eof:
                        raise DecompressionError("zstd stream ends before its end") from None
                    return None
            data, self._in = self._in[: self._SLICE], self._in[self._SLICE :]
            if self._d.eof:
                self._d = self._dctx.decompressobj()
            self._fed = True
            try:
                out: bytes = self._d.decompress(data)
            except zstandard.ZstdError as exc:
                raise DecompressionError(f"corrupt zstd stream: {exc}") from exc
            if self._d.eof and self._d.unused_data:
                self._in = self._d.unused_data + self._in
            if out:
                return out

    async def _aclose(self) -> None:
        await self._inner.aclose()


class GzipStream(ChunkStream):
    """Deflate ``inner`` into gzip on the fly; the output is deterministic for a level."""

    def __init__(self, inner: ByteReceiveStream, level: int = 1) -> None:
        super().__init__()
        self._inner = inner
        self._c = zlib.compressobj(level, zlib.DEFLATED, 31)
        self._done = False

    async def _next(self) -> bytes | None:
        while not self._done:
            try:
                data = await self._inner.receive(CHUNK_SIZE)
            except EndOfStream:
                self._done = True
                out: bytes = self._c.flush()
                return out or None
            out = await _cpu(self._c.compress, data)
            if out:
                return out
        return None

    async def _aclose(self) -> None:
        await self._inner.aclose()


async def decompress(stream: ByteReceiveStream) -> ByteReceiveStream:
    """Inflate ``stream`` if it starts with a gzip or zstd magic; pass it through otherwise."""
    try:
        first = await stream.receive(CHUNK_SIZE)
    except EndOfStream:
        return PrefixedStream(b"", stream)
    except BaseException:
        await stream.aclose()
        raise
    inner = PrefixedStream(first, stream)
    kind = sniff(first)
    if kind == "gzip":
        return GunzipStream(inner)
    if kind == "zstd":
        return ZstdDecompressStream(inner)
    return inner
