"""Lanes: ordered background work for one stream, without a loop round trip per job.

A stream that hashes or writes 1 MiB chunks pays a thread hop per chunk if it
awaits each job (``to_thread.run_sync``, aiofiles); worse, it works in
lockstep with the consumer. A lane instead queues jobs and one pool thread
drains the queue back to back, so hashing and writing run beside the event
loop, on the other core. The loop waits only when the queued bytes of all
streams are over their shared budget (back pressure) and at the end
(``join``).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

from ._memory_budget import MemoryBudget, memory_budget

__all__ = ["Lane", "SerialExecutor"]

T = TypeVar("T")

_POOL = ThreadPoolExecutor(
    max_workers=max(8, 4 * (os.cpu_count() or 1)), thread_name_prefix="aiolayercache-lane"
)


class Lane:
    """Runs ``fn(chunk)`` jobs in order on a pool thread, charging queued chunks to a budget.

    Queued chunks are charged to ``budget`` (by default the running loop's
    :func:`~aiolayercache._memory_budget.memory_budget`, shared by every
    stream of the loop): :meth:`submit` waits while the chunk does not fit.
    A job that raises stops the lane: later jobs are dropped and the error is
    raised by the next :meth:`submit` or :meth:`join`. :meth:`close` drops
    what is queued and waits for the running job, so a resource the jobs use
    can be released safely after it. Dropped jobs release their charge.
    """

    def __init__(self, budget: MemoryBudget | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._budget = budget if budget is not None else memory_budget()
        self._lock = threading.Lock()
        self._jobs: deque[tuple[Callable[[bytes], object], bytes]] = deque()
        self._running = False
        self._closed = False
        self.error: BaseException | None = None
        self._waiters: list[asyncio.Future[None]] = []

    def _wake(self) -> None:
        # Called with the lock held, from any thread.
        if not self._waiters:
            return
        waiters, self._waiters = self._waiters, []

        def wake() -> None:
            for w in waiters:
                if not w.done():
                    w.set_result(None)

        try:
            self._loop.call_soon_threadsafe(wake)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _drop(self) -> None:
        # With the lock held: forget queued jobs and release what they held.
        while self._jobs:
            self._budget.release(self._jobs.popleft()[1])

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._jobs or self.error is not None or self._closed:
                    self._drop()
                    self._running = False
                    self._wake()
                    return
                fn, chunk = self._jobs.popleft()
            try:
                fn(chunk)
            except BaseException as exc:
                with self._lock:
                    self.error = exc
            finally:
                self._budget.release(chunk)

    async def _wait(self, ready: Callable[[], bool]) -> None:
        while True:
            with self._lock:
                if ready():
                    return
                fut: asyncio.Future[None] = self._loop.create_future()
                self._waiters.append(fut)
            await fut

    async def submit(self, fn: Callable[[bytes], object], chunk: bytes) -> None:
        """Queue ``fn(chunk)``; wait first until the chunk fits in the budget."""
        if self.error is not None:
            raise self.error
        if self._closed:
            raise RuntimeError("lane is closed")
        await self._budget.acquire(chunk)
        with self._lock:
            stopped = self.error is not None or self._closed  # (while this job waited)
            start = not stopped and not self._running
            if not stopped:
                self._jobs.append((fn, chunk))
                self._running = True
        if stopped:
            self._budget.release(chunk)
            raise self.error if self.error is not None else RuntimeError("lane is closed")
        if start:
            _POOL.submit(self._drain)

    async def join(self) -> None:
        """Wait until every queued job ran; raise the first job error."""
        await self._wait(lambda: not self._running)
        if self.error is not None:
            raise self.error

    async def close(self) -> None:
        """Drop queued jobs and wait for the running one (safe to call more than once)."""
        with self._lock:
            self._closed = True
            self._drop()
        await self._wait(lambda: not self._running)


class SerialExecutor(Executor):
    """An executor that runs its jobs one at a time, in order, on the shared lane pool.

    A file handed to aiofiles with this executor gets its writes queued in
    order without a thread of its own and without the caller awaiting each
    one. :meth:`aclose` drops queued jobs (their futures are cancelled) and
    waits for the running one, so the file can be closed safely after it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = deque()
        self._running = False
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if kwargs:
            fn = functools.partial(fn, **kwargs)
        fut: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("executor is closed")
            self._jobs.append((fut, fn, args))
            start = not self._running
            self._running = True
        if start:
            _POOL.submit(self._drain)
        return fut

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._running = False
                    return
                fut, fn, args = self._jobs.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

    async def aclose(self) -> None:
        """Cancel queued jobs and wait for the one running (safe to call more than once)."""
        with self._lock:
            dropped = list(self._jobs)
            self._jobs.clear()
            closed, self._closed = self._closed, False
        for fut, _, _ in dropped:
            fut.cancel()
        barrier = self.submit(_nothing)  # runs once the job in progress is done
        with self._lock:
            self._closed = True
        if not closed:
            await asyncio.wrap_future(barrier)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if cancel_futures:
                for fut, _, _ in self._jobs:
                    fut.cancel()
                self._jobs.clear()


def _nothing() -> None:
    return None
