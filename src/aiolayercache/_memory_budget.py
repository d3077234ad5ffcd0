"""One memory budget per event loop: the chunk bytes that all its streams have in flight.

A stream reads a chunk from a socket, hashes it in a lane and writes it to
files through queues that pool threads drain (:mod:`._lane`,
:mod:`._atomic`). Each queue bounded on its own lets memory grow with the
streams in flight; this budget bounds their sum instead, so the peak stays
flat however many layers and images a program pulls at once.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import weakref
from collections import deque

__all__ = ["DEFAULT_LIMIT", "MemoryBudget", "memory_budget", "tune_malloc"]

DEFAULT_LIMIT = 2 * 1024 * 1024
"""The limit of a loop's budget unless set otherwise (``memory_budget().limit = n``)."""


class MemoryBudget:
    """The bytes of the chunks in flight: read ahead of need, or queued for background work.

    Two kinds of holders charge chunks here:

    - *jobs* (:meth:`acquire`, :meth:`release`): a hash lane or a file's write
      queue holds a chunk until a pool thread is done with it;
    - *streams* (:meth:`reserve`, then :meth:`hold`, :meth:`unhold`): a
      stream that reads from the network reserves room before it takes a
      chunk's worth from its connection (so when the budget is full the
      bytes wait in the connection's buffer and the kernel, not here; it
      holds no room while it waits on the network), turns the reservation
      into a hold on the chunk it read, and keeps that hold until it is
      asked for the next chunk, so the chunk stays charged while it travels
      to the lanes and files that take it.

    A chunk object is charged once, when its first holder takes it, and
    released when its last holder lets go: a chunk that is read, hashed,
    written to a cache entry and written to a layout blob counts once.

    A holder waits while its bytes do not fit under :attr:`limit`, except
    when no job holds anything: then what is charged is only streams'
    reservations and holds, which wait on the network or on consumers and
    which no pool thread will free, so waiting would be for nothing. So
    nothing deadlocks, however many streams share the budget and whatever
    their consumers do (read them in turn, interleave them, leave one open),
    and streams stalled on a slow server hold up nobody else. The budget is
    exceeded only while no job holds anything (the disk keeps up), by what
    the streams in flight are reading: at most one chunk each.

    Every charge must be matched by one release of the same object, made
    while the caller still references it (the object's ``id`` is the key).
    :meth:`release` (and :meth:`unhold`) may be called from any thread; all
    else from the loop's. :attr:`high_water` is the most ever charged at
    once; :attr:`waits` counts the times a holder had to wait.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 1:
            raise ValueError("the memory budget must be at least one byte")
        self.limit = limit
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # State the loop's thread alone touches (no lock: pool threads contending for one
        # with the loop cost more than the bookkeeping itself).
        # id(chunk) -> [holders, of which streams, size]; the chunk is alive while listed.
        self._chunks: dict[int, list[int]] = {}
        self._charged = 0  # chunk bytes and reservations
        self.reserved = 0
        self._streams = 0  # reservations, and bytes of chunks that only streams hold
        self.high_water = 0
        self.waits = 0
        self._waiters: list[asyncio.Future[None]] = []
        # Let go of on other threads (the ids of chunks), counted by the loop's thread at
        # its next look, before anything else (so an id reused since is not mistaken), or
        # at once when somebody waits. deque.append is atomic: no lock here either.
        self._released: deque[tuple[int, bool]] = deque()
        self._poked = False

    @property
    def charged(self) -> int:
        """Bytes charged now: chunks in flight and reservations."""
        if threading.get_ident() == self._loop_thread:
            self._count_released()
        return self._charged

    def _admits(self, n: int) -> bool:
        # Fits, or no job holds anything (nothing will be freed without the network's
        # or a consumer's help).
        return self._charged + n <= self.limit or self._charged == self._streams

    def _charge(self, n: int) -> None:
        self._charged += n
        if self._charged > self.high_water:
            self.high_water = self._charged

    def _add(self, chunk: bytes, stream: bool) -> None:
        entry = self._chunks.get(id(chunk))
        if entry is None:
            self._chunks[id(chunk)] = [1, int(stream), len(chunk)]
            self._charge(len(chunk))
            if stream:
                self._streams += len(chunk)
            return
        if entry[0] == entry[1] and not stream:
            self._streams -= entry[2]  # a job holds it now: it will be let go
        entry[0] += 1
        entry[1] += stream

    def _drop(self, key: int, stream: bool) -> bool:
        """Remove one holder of the chunk ``id`` ``key``; say whether waiters may go now."""
        entry = self._chunks[key]
        streams_only = entry[0] == entry[1]
        entry[0] -= 1
        entry[1] -= stream
        if entry[0] == 0:
            del self._chunks[key]
            self._charged -= entry[2]
            if streams_only:
                self._streams -= entry[2]
            return True
        if entry[0] == entry[1] and not streams_only:
            self._streams += entry[2]  # only streams hold it now
            return True
        return False

    def _count_released(self) -> bool:
        freed = False
        released = self._released
        while released:
            key, stream = released.popleft()
            freed |= self._drop(key, stream)
        return freed

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _on_released(self) -> None:
        self._poked = False  # (before counting: a release after this pokes again)
        if self._count_released():
            self._wake_all()

    def _let_go(self, chunk: bytes, stream: bool) -> None:
        if threading.get_ident() != self._loop_thread:
            self._released.append((id(chunk), stream))
            if self._waiters and not self._poked:  # (somebody waits: count it now)
                self._poked = True
                try:
                    self._loop.call_soon_threadsafe(self._on_released)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    pass
            return
        freed = self._count_released()
        if self._drop(id(chunk), stream) or freed:
            self._wake_all()

    async def _admit(self, n: int, chunk: bytes | None) -> None:
        # Charge ``n`` reserved bytes (chunk None) or a job's hold on ``chunk``, once admitted.
        counted = False
        while True:
            if self._count_released() and self._waiters:
                self._wake_all()
            if chunk is not None and id(chunk) in self._chunks:
                self._add(chunk, False)  # charged already: a holder more costs nothing
                return
            if self._admits(n):
                if chunk is None:
                    self.reserved += n
                    self._streams += n
                    self._charge(n)
                else:
                    self._add(chunk, False)
                return
            if not counted:
                self.waits += 1
                counted = True
            fut: asyncio.Future[None] = self._loop.create_future()
            self._waiters.append(fut)
            if self._released:
                continue  # let go of on another thread before it could see this waiter
            await fut

    async def acquire(self, chunk: bytes) -> None:
        """A job takes ``chunk``: charge it (free when it is charged already), waiting until
        it fits. Cancelled while waiting, nothing is charged."""
        await self._admit(len(chunk), chunk)

    def release(self, chunk: bytes) -> None:
        """A job is done with ``chunk`` (from any thread)."""
        self._let_go(chunk, False)

    async def reserve(self, n: int) -> None:
        """Room for ``n`` bytes a stream is about to read; waits until they fit.

        Follow with :meth:`hold` (the chunk read) or :meth:`unreserve`.
        Cancelled while waiting, nothing is charged.
        """
        await self._admit(n, None)

    def unreserve(self, n: int) -> None:
        """Give back a reservation that no chunk filled."""
        self.reserved -= n
        self._streams -= n
        self._charged -= n
        self._count_released()
        self._wake_all()

    def hold(self, chunk: bytes, reserved: int) -> None:
        """Turn a reservation of ``reserved`` bytes into a stream's hold on ``chunk``."""
        freed = self._count_released()
        self.reserved -= reserved
        self._streams -= reserved
        self._charged -= reserved
        self._add(chunk, True)
        if freed or len(chunk) < reserved:
            self._wake_all()

    def unhold(self, chunk: bytes) -> None:
        """A stream lets go of ``chunk`` (it was passed on; from any thread, for finalizers)."""
        self._let_go(chunk, True)


_BUDGETS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, MemoryBudget] = (
    weakref.WeakKeyDictionary()
)


def memory_budget() -> MemoryBudget:
    """The budget of the running event loop (made with :data:`DEFAULT_LIMIT` on first use)."""
    loop = asyncio.get_running_loop()
    budget = _BUDGETS.get(loop)
    if budget is None:
        budget = _BUDGETS[loop] = MemoryBudget(DEFAULT_LIMIT)
    return budget


_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def tune_malloc(*, mmap_threshold: int = 4 << 20, trim_threshold: int = 32 << 20) -> bool:
    """Set glibc's malloc for streaming chunks of about 1 MiB; say whether it was done.

    A process-wide setting, so the library never calls it: the command line
    does, and a program may. By default glibc serves a freed 1 MiB chunk's
    successor from the heap but gives the heap's top back to the kernel
    whenever a few MiB there are free, so with little in flight (the memory
    budget) the same pages are returned and faulted in again for every
    chunk. Fixed thresholds keep chunks of up to ``mmap_threshold`` in the
    heap and up to ``trim_threshold`` free at its top: the peak stays what
    is in flight, the page faults go. Not glibc (or not Linux): nothing is
    done.
    """
    if sys.platform != "linux":
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError):
        return False
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
