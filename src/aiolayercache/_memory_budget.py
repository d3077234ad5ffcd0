"""One memory budget per event loop: the bytes that all its streams queue for background work.

A stream hashes its chunks in a lane and writes them to files through queues
that pool threads drain (:mod:`._lane`, :mod:`._atomic`). Each queue bounded
on its own lets memory grow with the streams in flight; this budget bounds
their sum instead, so the peak stays flat however many layers and images a
program pulls at once.
"""

from __future__ import annotations

import asyncio
import threading
import weakref

__all__ = ["DEFAULT_LIMIT", "MemoryBudget", "memory_budget"]

DEFAULT_LIMIT = 4 * 1024 * 1024
"""The limit of a loop's budget unless set otherwise (``memory_budget().limit = n``)."""


class MemoryBudget:
    """The bytes of chunks queued for background work (hash lanes, file writes).

    A chunk object is charged once, when its first holder takes it, and
    released when its last holder is done with it: a chunk that is hashed,
    written to a cache entry and written to a layout blob counts once. A
    holder waits in :meth:`acquire` while the chunk does not fit under
    :attr:`limit`; any chunk fits when nothing is charged, so one bigger than
    the whole budget goes alone.

    Nothing deadlocks however many streams share it, and whatever their
    consumers do (read them in turn, interleave them, leave one open): every
    charged byte belongs to a job that a pool thread runs to its end without
    the event loop's help (or that is dropped, which releases it too), so the
    total always drains to zero, and a waiter is then let in. Bytes a stream
    holds in hand (what it is reading, what it hands out) are not charged: a
    charge that only the consumer's progress could release would deadlock.

    :meth:`release` may be called from any thread. :attr:`high_water` is the
    most ever charged at once; :attr:`waits` counts the times a holder waited.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 1:
            raise ValueError("the memory budget must be at least one byte")
        self.limit = limit
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._holders: dict[int, int] = {}  # id(chunk) -> how many holders (the chunk is alive)
        self.charged = 0
        self.high_water = 0
        self.waits = 0
        self._waiters: list[asyncio.Future[None]] = []

    def _take(self, chunk: bytes) -> bool:
        # With the lock held.
        key = id(chunk)
        holders = self._holders.get(key)
        if holders is not None:
            self._holders[key] = holders + 1
            return True
        size = len(chunk)
        if self.charged and self.charged + size > self.limit:
            return False
        self._holders[key] = 1
        self.charged += size
        if self.charged > self.high_water:
            self.high_water = self.charged
        return True

    def try_acquire(self, chunk: bytes) -> bool:
        """Charge ``chunk`` (or add a holder to it) if it fits now; say whether it did."""
        with self._lock:
            return self._take(chunk)

    async def acquire(self, chunk: bytes) -> None:
        """Charge ``chunk`` (or add a holder to it), waiting until it fits.

        Cancelled while waiting, nothing is charged. Every acquire must be
        matched by one :meth:`release` of the same object, made while the
        caller still holds a reference to it.
        """
        with self._lock:
            if self._take(chunk):
                return
            self.waits += 1
        while True:
            with self._lock:
                if self._take(chunk):
                    return
                fut: asyncio.Future[None] = self._loop.create_future()
                self._waiters.append(fut)
            await fut

    def release(self, chunk: bytes) -> None:
        """One holder of ``chunk`` is done with it (from any thread)."""
        with self._lock:
            key = id(chunk)
            holders = self._holders[key]
            if holders > 1:
                self._holders[key] = holders - 1
                return
            del self._holders[key]
            self.charged -= len(chunk)
            if not self._waiters:
                return
            waiters, self._waiters = self._waiters, []
        try:
            self._loop.call_soon_threadsafe(_wake, waiters)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for w in waiters:
        if not w.done():
            w.set_result(None)


_BUDGETS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, MemoryBudget] = (
    weakref.WeakKeyDictionary()
)


def memory_budget() -> MemoryBudget:
    """The budget of the running event loop (made with :data:`DEFAULT_LIMIT` on first use)."""
    loop = asyncio.get_running_loop()
    budget = _BUDGETS.get(loop)
    if budget is None:
        budget = _BUDGETS[loop] = MemoryBudget()
    return budget
