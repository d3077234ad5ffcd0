"""Single-flight: one filler per cache entry, in this process and across processes.

In a process, the first task to want an entry claims a :class:`Flight`; the
others wait on its event, then read the committed file (or take over if the
filler failed). Across processes, the filler also holds the entry's lock
file (``flock``) in ``.aiolayercache/locks``; a process that finds it locked
polls until it is free, saying after a few seconds what it waits for, and
gives up (fills the entry itself) when the other fill stops making progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import logging
import os
import time

import anyio
import anyio.to_thread

from .._hash import Hash

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["FLIGHTS", "OPENING", "EntryLocks", "Flight", "unlock"]

log = logging.getLogger("aiolayercache.cache")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# A wait on another process's fill longer than this is logged, with what it waits for.
_NOTICE_AFTER = 5.0
_NOTICE_EVERY = 30.0
# How many times waiters move on from a stalled filler to a new one before each fetches.
_TAKEOVERS = 2


class Flight:
    """One task filling one entry; others wait on it (in-process single-flight)."""

    def __init__(self, key: tuple[int, str]) -> None:
        self.key = key
        self.event = anyio.Event()
        self._loop = asyncio.get_running_loop()

    def release(self) -> None:
        if FLIGHTS.get(self.key) is self:
            del FLIGHTS[self.key]
        self.event.set()

    def release_threadsafe(self) -> None:
        if FLIGHTS.get(self.key) is self:
            del FLIGHTS[self.key]
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.event.set)


# Flights in progress, keyed by (event loop, entry path).
FLIGHTS: dict[tuple[int, str], Flight] = {}
# The flights whose upstream the current task is opening: a fill whose upstream reads the
# same entry through the same cache (an image wrapped twice) must not wait on itself.
OPENING: contextvars.ContextVar[frozenset[tuple[int, str]]] = contextvars.ContextVar(
    "_OPENING", default=frozenset()
)


def unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)  # closing the descriptor drops its flock


class EntryLocks:
    """The lock files of one cache's entries, and how to wait for another process."""

    def __init__(self, label: object, lockdir: str, tmpdir: str) -> None:
        self.label = label
        self.lockdir = lockdir
        self.tmpdir = tmpdir

    def try_lock(self, h: Hash, generation: int = 0) -> int | None:
        """Entry ``h``'s lock file (of a takeover ``generation``), locked; None if held.

        Never through a symlink: one planted in our locks directory is removed."""
        name = f"{h.algorithm}-{h.hex}.lock" + (f".{generation}" if generation else "")
        path = os.path.join(self.lockdir, name)
        flags = os.O_RDWR | os.O_CREAT | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            os.unlink(path)
            log.warning("cache %s: lock file %s was a symlink; removed", self.label, path)
            fd = os.open(path, flags, 0o644)
        if fcntl is None:  # pragma: no cover - Windows: in-process single-flight only
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    async def lock(self, h: Hash, stalled_after: float) -> int | None:
        """Take entry ``h``'s lock file, waiting while another process holds it.

        Polls with a growing pause (10 ms to 250 ms), so waiting stays
        cancellable. A wait of more than a few seconds is logged with what it
        waits for. When the filler's temp file has not grown for
        ``stalled_after`` seconds, the waiters move on to the next lock file of
        the entry (a takeover generation): the first to get it fetches the
        entry, the others wait on it, so a stalled filler costs one more
        download, not one per waiter. After a few generations the wait ends
        without a lock (None) and the entry is fetched here too (the rename
        keeps either copy whole).
        """
        delay = 0.01
        generation = 0
        started = last_check = last_growth = time.monotonic()
        told = -_NOTICE_EVERY
        seen = -1
        while True:
            fd = self.try_lock(h, generation)
            if fd is not None:
                return fd
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.25)
            now = time.monotonic()
            if now - last_check < 1.0:
                continue
            last_check = now
            size = await anyio.to_thread.run_sync(self.filling_size, h)
            if size != seen:
                seen, last_growth = size, now
            if now - last_growth >= stalled_after:
                stalled = now - last_growth
                if generation >= _TAKEOVERS:
                    log.warning(
                        "cache %s: the fill of %s made no progress for %.0f s; fetching it here",
                        self.label,
                        h,
                        stalled,
                    )
                    return None
                generation += 1
                last_growth = now
                log.warning(
                    "cache %s: another process filling %s made no progress for %.0f s; "
                    "taking over (one process fetches it)",
                    self.label,
                    h,
                    stalled,
                )
                continue
            if now - started >= _NOTICE_AFTER and now - told >= _NOTICE_EVERY:
                told = now
                log.warning(
                    "cache %s: waiting for another process to finish filling %s (%d bytes so far)",
                    self.label,
                    h,
                    max(seen, 0),
                )

    def filling_size(self, h: Hash) -> int:
        """Bytes in the temp files filling ``h`` (named after it), as a sign of progress."""
        prefix = f".{h.hex[:16]}."
        total = 0
        try:
            with os.scandir(self.tmpdir) as it:
                for e in it:
                    if e.name.startswith(prefix):
                        with contextlib.suppress(OSError):
                            total += e.stat(follow_symlinks=False).st_size
        except OSError:
            pass
        return total
