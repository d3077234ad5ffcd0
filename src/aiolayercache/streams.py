"""Byte streams: verification, tees into sinks, (de)compression, files and bytes.

Every stream here is an :class:`anyio.abc.ByteReceiveStream` that hands out
chunks of about :data:`CHUNK_SIZE` (1 MiB) by default, so per-chunk costs (a
thread hop, a task switch) are paid rarely. CPU-heavy work on big chunks
(hashing, inflating, deflating) runs in worker threads, which keeps the event
loop responsive and lets the second core work while the loop reads the next
chunk.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import aiofiles
import anyio
import anyio.to_thread
import zstandard
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream
from anyio.abc import ByteReceiveStream

from ._attrs import ProvenFile, StreamAttribute
from ._errors import DecompressionError, DigestMismatchError, SizeMismatchError
from ._hash import Hash
from ._lane import Lane

__all__ = [
    "CHUNK_SIZE",
    "BytesStream",
    "ChunkStream",
    "FileStream",
    "GunzipStream",
    "GzipStream",
    "NotARegularFileError",
    "PrefixedStream",
    "ProvenFile",
    "Sink",
    "StreamAttribute",
    "VerifyingStream",
    "ZstdDecompressStream",
    "decompress",
    "drain",
    "hash_stream",
    "read_all",
]

log = logging.getLogger("aiolayercache")

CHUNK_SIZE = 1 << 20
# Below this, work is done inline: a thread hop would cost more than it saves.
_THREAD_MIN = 128 * 1024

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


async def _cpu(func: Callable[..., Any], *args: Any) -> Any:
    """Run CPU-bound ``func`` in a worker thread when the input is big, inline otherwise."""
    size = len(args[0]) if args and isinstance(args[0], bytes | memoryview) else 0
    if size >= _THREAD_MIN:
        return await anyio.to_thread.run_sync(func, *args)
    return func(*args)


class ChunkStream(ByteReceiveStream):
    """Base for chunk producers: subclasses implement ``_next`` and ``_aclose``.

    ``_next`` returns the next non-empty chunk or ``None`` at the end. This base
    honours ``max_bytes`` by keeping the rest of a chunk for the next receive.
    """

    def __init__(self) -> None:
        self._buf = memoryview(b"")
        self._closed = False

    async def _next(self) -> bytes | None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def _aclose(self) -> None:
        return None

    async def receive(self, max_bytes: int = CHUNK_SIZE) -> bytes:
        if self._closed:
            raise ClosedResourceError
        if not self._buf:
            while True:
                chunk = await self._next()
                if chunk is None:
                    raise EndOfStream
                if chunk:
                    break
            if len(chunk) <= max_bytes:
                return chunk
            self._buf = memoryview(chunk)
        out = self._buf[:max_bytes]
        self._buf = self._buf[max_bytes:]
        return bytes(out)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buf = memoryview(b"")
        with anyio.CancelScope(shield=True):
            await self._aclose()


class BytesStream(ChunkStream):
    """A stream over bytes held in memory."""

    def __init__(self, data: bytes, chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__()
        self._data = memoryview(data)
        self._pos = 0
        self._chunk = chunk_size

    async def _next(self) -> bytes | None:
        if self._pos >= len(self._data):
            return None
        end = self._pos + self._chunk
        out = bytes(self._data[self._pos : end])
        self._pos = end
        return out


class PrefixedStream(ChunkStream):
    """``prefix`` then the rest of ``inner`` (used to put back a sniffed chunk)."""

    def __init__(self, prefix: bytes, inner: ByteReceiveStream) -> None:
        super().__init__()
        self._prefix: bytes | None = prefix or None
        self._inner = inner

    async def _next(self) -> bytes | None:
        if self._prefix is not None:
            out, self._prefix = self._prefix, None
            return out
        try:
            return await self._inner.receive(CHUNK_SIZE)
        except EndOfStream:
            return None

    async def _aclose(self) -> None:
        await self._inner.aclose()


class FileStream(ChunkStream):
    """A file read with aiofiles in big chunks. Open with ``await FileStream.open(path)``."""

    def __init__(self, file: Any, path: str, chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__()
        self._file = file
        self.path = path
        self._chunk = chunk_size

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], chunk_size: int = CHUNK_SIZE, *, regular: bool = False
    ) -> FileStream:
        """Open ``path`` for reading. With ``regular``, only a regular file that is not a
        symlink opens (never blocking on a FIFO): anything else is :class:`NotARegularFileError`."""
        if not regular:
            return cls(await aiofiles.open(path, "rb", buffering=0), os.fspath(path), chunk_size)
        f = await aiofiles.open(path, "rb", buffering=0, opener=_regular_opener)
        out = cls(f, os.fspath(path), chunk_size)
        if not stat.S_ISREG(os.fstat(out.fileno()).st_mode):
            await out.aclose()
            raise NotARegularFileError(errno.EINVAL, "not a regular file", os.fspath(path))
        return out

    async def _next(self) -> bytes | None:
        try:
            data: bytes = await self._file.read(self._chunk)
        except OSError as exc:
            raise BrokenResourceError(f"reading {self.path}: {exc}") from exc
        return data or None

    def fileno(self) -> int:
        fd: int = self._file.fileno()
        return fd

    async def _aclose(self) -> None:
        await self._file.close()


class NotARegularFileError(OSError):
    """Raised by ``FileStream.open(..., regular=True)`` for a directory, FIFO, device or socket."""


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def _regular_opener(path: str, flags: int) -> int:
    # O_NOFOLLOW: a symlink fails (ELOOP) instead of leading elsewhere; O_NONBLOCK: a FIFO
    # opens at once (and is then refused) instead of waiting for a writer forever.
    return os.open(path, flags | _NOFOLLOW)


class Sink(Protocol):
    """Where a :class:`VerifyingStream` copies the bytes it hands out.

    ``write`` gets every chunk in order; ``commit`` is called once the whole
    stream verified; ``abort`` on any failure, early close or cancellation.
    A sink must not raise from ``abort``.
    """

    async def write(self, chunk: bytes) -> None: ...
    async def commit(self) -> None: ...
    async def abort(self) -> None: ...


class VerifyingStream(ChunkStream):
    """Hash and count ``inner`` as it streams; never end cleanly on bad bytes.

    The stream reads one chunk ahead and holds the last chunk back until the
    digest (and ``size``, when given) is known to match, so a consumer never
    sees all the bytes and a clean end of stream for content that is wrong:
    it gets :class:`DigestMismatchError` (or :class:`SizeMismatchError`)
    instead. Each chunk is also written to ``sinks``, which are committed
    after the match and before the last chunk is released, or aborted on any
    failure, cancellation or early close. ``on_mismatch`` runs after a
    mismatch (a cache removes its entry there).

    Hashing runs in a :class:`~aiolayercache._lane.Lane` beside the event
    loop, so it overlaps with receiving the next chunk. When ``inner`` is
    itself a ``VerifyingStream`` for the same digest, its verdict is trusted
    and the bytes are not hashed twice (sizes are still counted).
    """

    def __init__(
        self,
        inner: ByteReceiveStream,
        expected: Hash,
        size: int | None = None,
        *,
        what: str | None = None,
        sinks: Sequence[Sink] = (),
        on_mismatch: Callable[[], Awaitable[None]] | None = None,
        proven_fd: int | None = None,
        from_cache: bool | None = None,
    ) -> None:
        super().__init__()
        self._inner = inner
        self.expected = expected
        self.expected_size = size
        self.what = what or str(expected)
        self._sinks = list(sinks)
        self._on_mismatch = on_mismatch
        self._hasher = expected.hasher()
        self._lane: Lane | None = None
        # What this stream guarantees at its end (StreamAttribute.verifies). A stream
        # under it that guarantees the same is trusted: its bytes are not hashed twice.
        self.verifies: tuple[Hash, int | None] = (expected, size)
        inner_verifies = inner.extra(StreamAttribute.verifies, None)
        self._trust_inner = (
            inner_verifies is not None
            and inner_verifies[0] == expected
            and (size is None or inner_verifies[1] in (None, size))
        )
        self.received = 0
        # The bytes pass through unchanged: what the inner stream declares holds here too,
        # except a proven file when this stream tees into sinks (a copy would skip them).
        self._attrs: dict[Any, Callable[[], Any]] = dict(inner.extra_attributes)
        if sinks:
            self._attrs.pop(StreamAttribute.proven_file, None)
        self._attrs[StreamAttribute.verifies] = lambda: self.verifies
        if from_cache is not None:
            self._attrs[StreamAttribute.from_cache] = lambda: from_cache
        if proven_fd is not None and size is not None:
            # A cache entry whose proof holds: a consumer may copy the open file whole,
            # hashing what lands; a mismatch condemns the entry as a mismatch here would.
            proven = ProvenFile(proven_fd, expected, size, self._condemn)
            self._attrs[StreamAttribute.proven_file] = lambda: proven
        self._ahead: bytes | None = None
        self._started = False
        self._ended = False
        self._failed = False
        self._settled = False  # sinks committed or aborted

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._attrs

    async def _condemn(self) -> None:
        if self._on_mismatch is not None:
            with anyio.CancelScope(shield=True):
                await self._on_mismatch()

    async def _recv(self) -> bytes | None:
        try:
            chunk = await self._inner.receive(CHUNK_SIZE)
        except EndOfStream:
            return None
        self.received += len(chunk)
        if self.expected_size is not None and self.received > self.expected_size:
            raise SizeMismatchError(self.what, self.expected_size, f"more than {self.received - 1}")
        if not self._trust_inner:
            if self._lane is None and len(chunk) >= _THREAD_MIN:
                self._lane = Lane()
            if self._lane is not None:
                await self._lane.submit(self._hasher.update, chunk)
            else:
                self._hasher.update(chunk)
        for sink in self._sinks:
            await sink.write(chunk)
        return chunk

    async def _finish(self) -> None:
        if self._lane is not None:
            await self._lane.join()
        if self.expected_size is not None and self.received != self.expected_size:
            raise SizeMismatchError(self.what, self.expected_size, self.received)
        if not self._trust_inner:
            actual = Hash(self.expected.algorithm, self._hasher.hexdigest())
            if actual != self.expected:
                raise DigestMismatchError(self.what, self.expected, actual)
        self._settled = True
        for sink in self._sinks:
            await sink.commit()

    async def _abort(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._lane is not None:
                await self._lane.close()
            if self._settled:
                return
            self._settled = True
            for sink in self._sinks:
                await sink.abort()

    async def _next(self) -> bytes | None:
        if self._ended:
            return None
        if self._failed:
            raise BrokenResourceError(f"{self.what}: stream failed earlier")
        try:
            if not self._started:
                self._started = True
                self._ahead = await self._recv()
                if self._ahead is None:
                    await self._finish()
                    self._ended = True
                    return None
            cur = self._ahead
            assert cur is not None
            nxt = await self._recv()
            if nxt is None:
                await self._finish()
                self._ended = True
            self._ahead = nxt
            return cur
        except BaseException as exc:
            self._failed = True
            self._ahead = None
            await self._abort()
            if isinstance(exc, DigestMismatchError):
                await self._condemn()
            raise

    async def _aclose(self) -> None:
        try:
            if not self._ended:
                await self._abort()
        finally:
            await self._inner.aclose()


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
    if first.startswith(GZIP_MAGIC):
        return GunzipStream(inner)
    if first.startswith(ZSTD_MAGIC):
        return ZstdDecompressStream(inner)
    return inner


async def read_all(stream: ByteReceiveStream, limit: int | None = None) -> bytes:
    """Read ``stream`` to its end and close it; raise ``ValueError`` past ``limit`` bytes."""
    parts: list[bytes] = []
    total = 0
    async with stream:
        async for chunk in stream:
            total += len(chunk)
            if limit is not None and total > limit:
                raise ValueError(f"stream is over the {limit}-byte limit")
            parts.append(chunk)
    return b"".join(parts)


async def drain(stream: ByteReceiveStream) -> int:
    """Read ``stream`` to its end, discarding the bytes; return how many there were."""
    n = 0
    async with stream:
        async for chunk in stream:
            n += len(chunk)
    return n


async def hash_stream(stream: ByteReceiveStream, algorithm: str = "sha256") -> tuple[Hash, int]:
    """The digest and size of everything in ``stream`` (which is closed)."""
    import hashlib

    h = hashlib.new(algorithm)
    n = 0
    async with stream:
        async for chunk in stream:
            n += len(chunk)
            await _cpu(h.update, chunk)
    return Hash(algorithm, h.hexdigest()), n
