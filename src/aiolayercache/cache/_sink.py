"""The sink that fills one cache entry while a verifying stream hands its bytes out."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import BinaryIO

from .._atomic import AtomicFile
from .._hash import Hash
from ..streams import sniff
from ._flight import EntryLocks, Flight, unlock
from ._proofs import Meta, ProofStore

__all__ = ["EntrySink", "claim"]


def _orphaned(flight: Flight, lock_box: list[int]) -> None:
    """Finalizer of a sink dropped without commit or abort (a stream never closed)."""
    if lock_box:
        unlock(lock_box.pop())
    flight.release_threadsafe()


class EntrySink:
    """Fills one cache entry through an :class:`AtomicFile` and records its proof.

    Write failures (disk full, quota, I/O errors) never fail the read: the
    sink reports the error once (``on_error``: the cache logs and counts it),
    drops its temp file and lets the verified bytes pass through uncached.
    Commit or abort releases the single-flight claim on the entry.
    """

    def __init__(
        self,
        store: ProofStore,
        h: Hash,
        info: dict[str, str],
        flight: Flight,
        lock_fd: int | None,
        *,
        durable: bool,
        on_error: Callable[[Hash, BaseException], None],
        on_commit: Callable[[Hash, int], None] | None = None,
        keep_open: bool = False,
    ) -> None:
        self._store = store
        self.h = h
        self._info = info
        self._flight = flight
        self._on_error = on_error
        self._on_commit = on_commit
        self._lock_box = [lock_fd] if lock_fd is not None else []
        self._file = AtomicFile(
            store.entry(h), store.tmpdir, durable=durable, tag=h.hex[:16], sync_dir=store.dirsync
        )
        self._file.keep_open = keep_open  # a layout may link the very file (take_committed)
        self._finalizer = weakref.finalize(self, _orphaned, flight, self._lock_box)

    def hold(self, lock_fd: int) -> None:
        """Take the entry's lock file (released with the sink)."""
        self._lock_box.append(lock_fd)

    def open_sync(self) -> None:
        """Create the temp file (blocking: in a worker thread); then :meth:`attach`."""
        try:
            self._file.open_sync()
        except OSError as exc:
            self._on_error(self.h, exc)

    def attach(self) -> None:
        if self._file.is_open:
            self._file.attach()

    async def open(self) -> None:
        try:
            await self._file.open()
        except OSError as exc:
            self._on_error(self.h, exc)

    async def write(self, chunk: bytes) -> None:
        if not self._file.is_open:
            return
        try:
            await self._file.write(chunk)
        except OSError as exc:
            self._on_error(self.h, exc)
            await self._file.discard()

    async def commit(self) -> None:
        try:
            if not self._file.is_open:
                return
            try:
                await self._file.commit(after=self._record)
            except OSError as exc:
                self._on_error(self.h, exc)
                await self._file.discard()
        finally:
            self.release()

    def _record(self) -> None:
        try:
            st = os.stat(self._file.final)
        except FileNotFoundError:
            return  # a bounded cache in another process evicted it already: nothing to prove
        meta = Meta(st.st_size, st.st_mtime_ns, st.st_ino, sniff(self._file.head), **self._info)
        self._store.save(self._file.final, meta)
        if self._on_commit is not None:  # (in the file's worker thread, after the rename)
            self._on_commit(self.h, st.st_size)

    def take_committed(self) -> int | None:
        """The committed entry's file, open (the inode these bytes went into), or None;
        the caller closes it."""
        return self._file.take_kept()

    def release(self) -> None:
        """Let go of the flight and the lock (a sink that will not fill)."""
        self._finalizer.detach()
        if self._lock_box:
            unlock(self._lock_box.pop())
        self._flight.release()

    async def abort(self) -> None:
        try:
            await self._file.discard()
        finally:
            self.release()


def claim(
    locks: EntryLocks, store: ProofStore, sink: EntrySink, no_locks: Callable[[OSError], None]
) -> tuple[Meta, BinaryIO] | bool | None:
    """(One worker-thread job.) Take the lock of ``sink``'s entry, look again, create
    the temp file.

    None: another process holds the lock (wait for it on the loop); the
    entry's meta and open file when it is there now; False: ``sink`` holds
    the lock (if locks work here: else ``no_locks`` is told) and its temp
    file is made."""
    h = sink.h
    try:
        fd = locks.try_lock(h)
    except OSError as exc:  # the locks directory cannot be used: fill without
        no_locks(exc)
    else:
        if fd is None:
            return None
        sink.hold(fd)
    try:
        got = store.open_entry(h, None)
    except FileNotFoundError:
        got = None
    except OSError as exc:  # unreadable, or no longer a regular file
        store.unusable(store.entry(h), exc)
        got = None
    if got is not None:
        return got
    sink.open_sync()
    return False
