"""Files written beside the loop and committed atomically (temp file, fsync, rename)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import aiofiles
import aiofiles.os
import aiofiles.threadpool.binary
import anyio
import anyio.to_thread

from ._dirs import DirSync, close_all, fsync_dir, hash_fd, link_fd, sweep_temps
from ._hash import Hash
from ._lane import SerialExecutor
from ._memory_budget import MemoryBudget, memory_budget

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["AtomicFile", "DirSync", "fsync_dir", "sweep_temps"]

SYNC_EVERY = 32 * 1024 * 1024
MAX_QUEUED = 8 * 1024 * 1024  # bytes of writes queued before ``write`` waits
_HASH_STEP = 1024 * 1024  # one reusable buffer of this per job: memory stays flat
HEAD_BYTES = 512  # what is kept of a file's start: enough to tell gzip, zstd and tar apart
_fdatasync = getattr(os, "fdatasync", os.fsync)
_fadvise = getattr(os, "posix_fadvise", None)
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", 4)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def _cleanup(tmp: str, fd_box: list[int]) -> None:
    if fd_box:
        with contextlib.suppress(OSError):
            os.close(fd_box.pop())
    with contextlib.suppress(OSError):
        os.unlink(tmp)


class AtomicFile:
    """A temp file in ``tmp_dir`` that becomes ``final`` by rename, or disappears.

    The temp file is an aiofiles file on a :class:`SerialExecutor`: writes are
    queued in order (the caller waits only past :data:`MAX_QUEUED` bytes) and
    run on a pool thread, overlapping with hashing and with the reader. With
    ``durable`` the data is flushed every 32 MiB, the file is fsynced before
    the rename and its directory after it. ``OSError`` from any step propagates; :meth:`discard`
    removes the temp file (also done by a finalizer if the object is dropped).
    """

    def __init__(
        self,
        final: str,
        tmp_dir: str,
        *,
        durable: bool,
        tag: str = "blob",
        sync_dir: bool | DirSync = True,
    ) -> None:
        self.final = final
        self._tmp_dir = tmp_dir
        self._tag = tag
        self.tmp = self._new_name()
        self.durable = durable
        # False: the caller fsyncs the directory itself, once for many files; a DirSync:
        # commits that land together share one fsync of the directory.
        self.sync_dir = sync_dir
        self._raw: Any = None  # the unbuffered file object over the temp descriptor
        # With keep_open, the committed file stays open (``kept``) until close_kept().
        self.keep_open = False
        self._kept: list[int] = []
        self._kept_finalizer = weakref.finalize(self, close_all, self._kept)
        self.head = b""
        self.size = 0
        self._fd_box: list[int] = []
        self._file: aiofiles.threadpool.binary.AsyncFileIO | None = None
        self._executor: SerialExecutor | None = None
        self._writes: deque[asyncio.Task[int]] = deque()
        self._pending_bytes = 0
        self._error: BaseException | None = None
        self._unsynced = 0
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def is_open(self) -> bool:
        return bool(self._fd_box)

    def _new_name(self) -> str:
        return os.path.join(self._tmp_dir, f".{self._tag}.{secrets.token_hex(8)}.tmp")

    def _open_sync(self) -> int:
        # Read and write: a kernel copy is read back and hashed before it is trusted.
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        for _ in range(5):
            fd = os.open(self.tmp, flags, 0o644)
            if fcntl is None:
                return fd
            # Held for the temp file's whole life: a sweep removes only unlocked temps.
            # Between create and lock the file is unlocked, so a sweep in another process
            # may take it: then take another name.
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # a sweep holds it, and removes it
                self.tmp = self._new_name()
                continue
            except OSError:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(self.tmp)
                raise
            try:
                ours = os.stat(self.tmp).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                ours = False
            if ours:
                return fd
            os.close(fd)  # swept before we locked it
            self.tmp = self._new_name()
        raise OSError(f"temp files in {self._tmp_dir} keep disappearing")

    def open_sync(self) -> None:
        """Create and lock the temp file. Blocking: call it in a worker thread, alone
        (:meth:`open`) or inside a bigger job of the caller's; then :meth:`attach`."""
        fd = self._open_sync()
        self._fd_box.append(fd)
        self._finalizer = weakref.finalize(self, _cleanup, self.tmp, self._fd_box)
        # closefd=False: the descriptor (and its flock) stays ours until the commit.
        self._raw = open(fd, "wb", buffering=0, closefd=False)  # noqa: SIM115

    def attach(self) -> None:
        """(On the event loop, after :meth:`open_sync`.) Ready the file for :meth:`write`."""
        self._executor = SerialExecutor()
        loop = asyncio.get_running_loop()
        self._file = aiofiles.threadpool.binary.AsyncFileIO(self._raw, loop, self._executor)

    async def open(self) -> None:
        """Create the temp file: one worker-thread job."""
        await anyio.to_thread.run_sync(self.open_sync)
        self.attach()

    def _check(self, what: str) -> aiofiles.threadpool.binary.AsyncFileIO:
        if self._file is None:
            raise RuntimeError(f"{what} after commit or discard")
        return self._file

    def _written(self, task: asyncio.Task[int], chunk: bytes, budget: MemoryBudget) -> None:
        self._pending_bytes -= len(chunk)
        budget.release(chunk)
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()

    async def _settle(self, budget: int) -> None:
        """Wait for queued writes until at most ``budget`` bytes are queued; raise their error."""
        while self._writes and self._writes[0].done():
            self._writes.popleft()  # they finish in order: drop what is done (and its chunk)
        while self._writes and self._pending_bytes > budget:
            await asyncio.wait([self._writes.popleft()])
        if self._error is not None:
            raise self._error

    async def write(self, chunk: bytes) -> None:
        """Queue ``chunk`` (aiofiles, in order, beside the loop); wait only while more
        than :data:`MAX_QUEUED` bytes are queued here or the chunk does not fit in the
        loop's memory budget (shared by every stream and file of the loop)."""
        f = self._check("write")
        assert self._executor is not None
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[: HEAD_BYTES - len(self.head)]
        self.size += len(chunk)
        await self._settle(MAX_QUEUED - len(chunk))
        budget = memory_budget()
        await budget.acquire(chunk)  # (free when a hash lane or another file holds it already)
        try:
            task = asyncio.ensure_future(f.write(chunk))
        except BaseException:
            budget.release(chunk)
            raise
        self._pending_bytes += len(chunk)
        task.add_done_callback(functools.partial(self._written, chunk=chunk, budget=budget))
        self._writes.append(task)
        if self.durable:
            self._unsynced += len(chunk)
            if self._unsynced >= SYNC_EVERY:
                # Flush now and then, in order with the writes, so the final fsync waits less.
                self._unsynced = 0
                self._executor.submit(_fdatasync, self._fd_box[0])

    def _copy_sync(self, src: int, size: int, expected: Hash) -> Hash:
        dst = self._fd_box[0]
        hasher = expected.hasher()
        buf = bytearray(_HASH_STEP)
        done = 0
        copy_range = getattr(os, "copy_file_range", None)
        step = 16 * 1024 * 1024
        while done < size:
            n = 0
            if copy_range is not None:
                try:
                    n = copy_range(src, dst, min(step, size - done), done)
                except OSError:
                    copy_range = None  # not on this filesystem pair: copy by hand
                    continue
                # Hash the bytes that landed, read back from the copy, not the source.
                hash_fd(dst, done, n, hasher, buf)
            else:
                got = os.preadv(src, [buf[: min(size - done, _HASH_STEP)]], done)
                view = memoryview(buf)[:got]
                hasher.update(view)
                while view:
                    view = view[os.write(dst, view) :]
                n = got
            if n == 0:
                raise OSError(f"source ended after {done} of {size} bytes")
            if self.durable and _fadvise is not None:
                # Start writeback of what was just copied, so the final fsync waits less.
                _fadvise(dst, done, n, _DONTNEED)
            done += n
        self.size += size
        return Hash(expected.algorithm, hasher.hexdigest())

    async def rewind(self, size: int) -> None:
        """Cut the file back to its first ``size`` bytes and write on from there (to drop
        a part whose source failed, before writing it again)."""
        self._check("rewind")
        await self._settle(0)
        fd = self._fd_box[0]

        def cut() -> None:
            os.ftruncate(fd, size)
            os.lseek(fd, size, os.SEEK_SET)

        await asyncio.get_running_loop().run_in_executor(self._executor, cut)
        self.size = size
        self.head = self.head[:size]

    def _link_proven_sync(
        self, src_fd: int, size: int, expected: Hash, after: Callable[[], object] | None
    ) -> Hash | None:
        link = self._new_name()
        if not link_fd(src_fd, link):
            return None
        try:
            hasher = expected.hasher()
            hash_fd(src_fd, 0, size, hasher, bytearray(_HASH_STEP))
            got = Hash(expected.algorithm, hasher.hexdigest())
            if got != expected:
                os.unlink(link)
                return got
            if self.durable:
                os.fsync(src_fd)  # its data on disk (at once when it is already)
            os.replace(link, self.final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(link)
            raise
        self._drop_temp()
        if after is not None:
            after()
        return got

    async def link_proven(
        self, src_fd: int, size: int, expected: Hash, after: Callable[[], object] | None = None
    ) -> Hash | None:
        """Become a hard link to the open file ``src_fd`` (a proven cache entry), hashed.

        One job: link the descriptor's inode under a temp name, hash its
        ``size`` bytes, and only when they hash to ``expected`` rename it to
        the final name and run ``after``. Returns the hash of what is there
        (the caller condemns the source when it is not ``expected``: then
        nothing was renamed), or None when no link can be made here (the temp
        file stays, for :meth:`copy_from`).
        """
        self._check("link")
        await self._settle(0)
        loop = asyncio.get_running_loop()
        got: Hash | None = await loop.run_in_executor(
            self._executor, self._link_proven_sync, src_fd, size, expected, after
        )
        if got == expected:
            self._file = self._raw = None
        return got

    async def copy_from(self, src_fd: int, size: int, expected: Hash) -> Hash:
        """Copy ``size`` bytes of open file ``src_fd`` in the kernel (``copy_file_range``).

        Returns the hash (in ``expected``'s algorithm) of the bytes that landed
        in the temp file, read back from it beside the loop: the caller compares
        it with ``expected`` before commit, so a source that changed since it
        was proven is never trusted.
        """
        self._check("copy")
        await self._settle(0)
        if not self.head:
            self.head = os.pread(src_fd, HEAD_BYTES, 0)
        loop = asyncio.get_running_loop()
        got: Hash = await loop.run_in_executor(
            self._executor, self._copy_sync, src_fd, size, expected
        )
        return got

    def _finish_sync(self) -> None:
        fd = self._fd_box[0]
        if self.durable:
            os.fsync(fd)
        if self.keep_open:  # the committed inode, for a consumer to link (then close_kept)
            self._kept.append(os.dup(fd))
        # Rename while the descriptor (and its flock) is still held: a sweep in another
        # writer removes only unlocked temp files, and would take this one otherwise.
        try:
            os.replace(self.tmp, self.final)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)  # the final name cannot be taken: leave nothing behind
            raise
        finally:
            self._fd_box.pop()
            os.close(fd)
        if self._finalizer is not None:
            self._finalizer.detach()
        if self.durable and isinstance(self.sync_dir, DirSync):
            self.sync_dir.sync()
        elif self.durable and self.sync_dir:
            fsync_dir(os.path.dirname(self.final))

    async def commit(self, after: Callable[[], object] | None = None) -> None:
        """Wait for the writes, then fsync, rename and fsync the directory.

        All of it, and ``after`` (run right after the rename), is one job on
        the file's executor: one thread hop, which small entries feel.
        """
        self._check("commit")
        await self._settle(0)
        self._file = None
        raw, self._raw = self._raw, None

        def finish() -> None:
            raw.close()  # closefd=False: marks it closed; the descriptor is closed below
            self._finish_sync()
            if after is not None:
                after()

        await asyncio.get_running_loop().run_in_executor(self._executor, finish)

    def _drop_temp(self) -> None:
        """(In the job that linked the final name.) The temp file was never written."""
        os.close(self._fd_box.pop())
        if self._finalizer is not None:
            self._finalizer.detach()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)

    async def commit_link(
        self, src_fd: int, *, fsync: bool, after: Callable[[], object] | None = None
    ) -> bool:
        """Become a hard link to the open file ``src_fd`` instead of a copy.

        One job: link the descriptor's very inode (not whatever its path names
        now) at the final name (atomic, as a rename; never over an existing
        blob), fsync it when asked (its source was not), then drop the unwritten
        temp file and run ``after``. False, with the temp file kept for writing,
        when no link can be made (another filesystem, not permitted, the final
        name taken, too many links).
        """
        self._check("link")
        await self._settle(0)

        def link() -> bool:
            if not link_fd(src_fd, self.final):
                return False
            if fsync:
                os.fsync(src_fd)
            self._drop_temp()
            if after is not None:
                after()
            return True

        linked: bool = await asyncio.get_running_loop().run_in_executor(self._executor, link)
        if linked:
            self._file = self._raw = None
        return linked

    def take_kept(self) -> int | None:
        """The committed file, open (with ``keep_open``): the caller closes it."""
        return self._kept.pop() if self._kept else None

    async def discard(self) -> None:
        """Drop the temp file (waits for a write in progress). Never raises OSError."""
        with anyio.CancelScope(shield=True):
            self._file = None
            for task in self._writes:
                task.cancel()
            self._writes.clear()
            if self._executor is not None:
                await self._executor.aclose()  # nothing touches the descriptor after this
            if self._finalizer is not None:
                self._finalizer.detach()
            if self._fd_box:
                with contextlib.suppress(OSError):
                    os.close(self._fd_box.pop())
                with contextlib.suppress(OSError):
                    await aiofiles.os.unlink(self.tmp)
