"""Byte streams: verification, tees into sinks, (de)compression, files and bytes.

Every stream here is an :class:`anyio.abc.ByteReceiveStream` that hands out
chunks of about :data:`CHUNK_SIZE` (1 MiB) by default, so per-chunk costs (a
thread hop, a task switch) are paid rarely. CPU-heavy work on big chunks
(hashing, inflating, deflating) runs in worker threads, which keeps the event
loop responsive and lets the second core work while the loop reads the next
chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import anyio
import anyio.to_thread
from anyio import BrokenResourceError, EndOfStream
from anyio.abc import ByteReceiveStream

from ._attrs import ProvenFile, StreamAttribute
from ._chunks import (
    _THREAD_MIN,
    CHUNK_SIZE,
    BytesStream,
    ChunkStream,
    FileStream,
    NotARegularFileError,
    PrefixedStream,
    _cpu,
)
from ._compression import (
    GZIP_MAGIC,
    ZSTD_MAGIC,
    GunzipStream,
    GzipStream,
    ZstdDecompressStream,
    decompress,
    sniff,
)
from ._errors import DigestMismatchError, SizeMismatchError
from ._hash import Hash
from ._lane import Lane

__all__ = [
    "CHUNK_SIZE",
    "GZIP_MAGIC",
    "ZSTD_MAGIC",
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
    "sniff",
]

log = logging.getLogger("aiolayercache")


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

    The stream holds the last chunk back until the digest (and ``size``, when
    given) is known to match, so a consumer never sees all the bytes and a
    clean end of stream for content that is wrong: it gets
    :class:`DigestMismatchError` (or :class:`SizeMismatchError`) instead.
    Each chunk is also written to ``sinks``, which are committed after the
    match and before the last chunk is released, or aborted on any failure,
    cancellation or early close. ``on_mismatch`` runs after a
    mismatch (a cache removes its entry there). With ``size`` the last chunk
    is known when it arrives; without, the stream reads one chunk ahead.

    Hashing runs in a :class:`~aiolayercache._lane.Lane` beside the event
    loop, so it overlaps with receiving the next chunk; the chunks it queues
    count against the loop's memory budget (:mod:`._memory_budget`). When
    ``inner`` is itself a ``VerifyingStream`` for the same digest, its verdict
    is trusted and the bytes are not hashed twice (sizes are still counted).
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
        tier: str | None = None,
        extra: Mapping[Any, Callable[[], Any]] | None = None,
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
        if tier is not None:
            self._attrs[StreamAttribute.tier] = lambda: tier
        if extra:
            self._attrs.update(extra)
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
            if self.expected_size is not None:
                return await self._next_sized(self.expected_size)
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

    async def _next_sized(self, size: int) -> bytes | None:
        # The size tells which chunk is the last: no need to read one ahead (and hold a
        # chunk per stream). The last is handed out only after the end was read, the
        # digest matched and the sinks committed; a short stream fails in _finish.
        chunk = await self._recv()
        if chunk is not None and self.received < size:
            return chunk
        if chunk is not None:
            while await self._recv() == b"":  # the end; one byte more is a SizeMismatchError
                pass
        await self._finish()
        self._ended = True
        return chunk

    async def _aclose(self) -> None:
        try:
            if not self._ended:
                await self._abort()
        finally:
            await self._inner.aclose()


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
