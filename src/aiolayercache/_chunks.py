"""Chunk streams: the base class, bytes in memory, a prefix put back, and files.

Every stream here hands out chunks of about :data:`CHUNK_SIZE` (1 MiB) by
default, so per-chunk costs (a thread hop, a task switch) are paid rarely.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

import aiofiles
import anyio
import anyio.to_thread
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream
from anyio.abc import ByteReceiveStream

__all__ = [
    "CHUNK_SIZE",
    "BytesStream",
    "ChunkStream",
    "FileStream",
    "NotARegularFileError",
    "PrefixedStream",
]

CHUNK_SIZE = 1 << 20
# Below this, work is done inline: a thread hop would cost more than it saves.
_THREAD_MIN = 128 * 1024


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
