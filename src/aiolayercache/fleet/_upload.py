"""A sink that tees a verified stream into one upload session of the fleet repository.

The caller's read drives it: each chunk goes into a small queue that a
streamed ``PATCH`` drains (a blob up to 4 MiB is sent in one ``PUT`` at the
end instead). Only after the stream verified (``commit``) is the session
closed with ``PUT ?digest=`` and the entry's manifest tagged, so the fleet
never names bytes that were not proven; that happens behind the read (the
caller is not held up by it; the cache's ``flush`` waits for it). A fleet that fails or stalls never
fails the read: the upload is cancelled (``DELETE``), the failure counted
and warned about once, and the bytes go on to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Protocol

import anyio
from yarl import URL

from .._errors import AioLayerCacheError
from .._hash import Hash
from ..remote._write import MONOLITHIC_MAX, Pusher

__all__ = ["UPLOAD_ERRORS", "Uploads", "UploadSink"]

# Chunks (about 1 MiB each) queued for the PATCH before a write waits for the fleet.
QUEUE_CHUNKS = 8
# What a failed fleet write raises; anything else is a bug and propagates.
UPLOAD_ERRORS = (AioLayerCacheError, OSError, TimeoutError, anyio.BrokenResourceError)


class Uploads(Protocol):
    """What an upload asks of the fleet cache that started it."""

    stall_timeout: float
    commit_timeout: float

    async def pusher(self) -> Pusher: ...

    async def tag_entry(self, h: Hash, size: int, media_type: str, kind: str) -> None:
        """Put the manifest that names entry ``h`` (its blob is in the repository)."""
        ...

    def write_failed(self, h: Hash, exc: BaseException) -> None:
        """Count a failed write (and warn about the first)."""
        ...

    def behind(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` after the read that started it (``flush`` waits for it)."""
        ...


class UploadSink:
    """One entry's upload: ``write`` as the caller reads, ``commit`` once verified."""

    def __init__(
        self,
        owner: Uploads,
        h: Hash,
        size: int | None,
        media_type: str,
        kind: str,
        *,
        settled: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._owner = owner
        self._h = h
        self._media_type = media_type
        self._kind = kind
        self._settled = settled
        self._small = size is not None and size <= MONOLITHIC_MAX
        self._parts: list[bytes] = []
        self._count = 0
        self._send, self._recv = anyio.create_memory_object_stream[bytes](QUEUE_CHUNKS)
        self._task: asyncio.Task[URL] | None = None
        self._location: URL | None = None
        self._pusher: Pusher | None = None
        self._done = False

    async def write(self, chunk: bytes) -> None:
        if self._done:
            return
        self._count += len(chunk)
        if self._small:
            self._parts.append(chunk)
            return
        try:
            with anyio.fail_after(self._owner.stall_timeout):
                if self._task is None:
                    # The session is opened here, not in the task: its location is known
                    # before anything can abandon it, so an abort always cancels it.
                    self._pusher = await self._owner.pusher()
                    location = self._location = await self._pusher.start_upload()
                    self._task = asyncio.create_task(self._patch(self._pusher, location))
                await self._send.send(chunk)
        except TimeoutError:
            await self._fail(TimeoutError(f"the fleet took no bytes for {self._stall()}"))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self._fail(await self._task_error())
        except UPLOAD_ERRORS as exc:  # the session could not be opened
            await self._fail(exc)

    def _stall(self) -> str:
        return f"{self._owner.stall_timeout:g} s"

    async def _patch(self, pusher: Pusher, location: URL) -> URL:
        try:

            async def body() -> AsyncIterator[bytes]:
                async for chunk in self._recv:
                    yield chunk

            return await pusher.patch_upload(location, body())
        finally:
            self._recv.close()  # a write waiting on a dead upload wakes up

    async def _task_error(self) -> BaseException:
        task = self._task
        if task is None:
            return RuntimeError("upload never started")
        with contextlib.suppress(BaseException):
            await task
        if task.cancelled():
            return RuntimeError("upload cancelled")
        exc = task.exception()
        return exc if exc is not None else RuntimeError("upload ended early")

    async def commit(self) -> None:
        # The bytes verified: the upload is finished behind the read (the caller gets its
        # last chunk now), and the entry is tagged once the registry has the blob.
        if self._done:
            return
        self._done = True
        self._owner.behind(self._finish())

    async def _finish(self) -> None:
        try:
            with anyio.fail_after(self._owner.commit_timeout):
                pusher = self._pusher = self._pusher or await self._owner.pusher()
                if self._task is None:
                    self._location = await pusher.start_upload()
                    await pusher.finish_upload(self._location, self._h, b"".join(self._parts))
                else:
                    self._send.close()
                    location = await self._task
                    await pusher.finish_upload(location, self._h)
                self._location = None
                self._parts = []
                await self._owner.tag_entry(self._h, self._count, self._media_type, self._kind)
        except Exception as exc:  # whatever the fleet did, the read has gone on without it
            await self._cleanup()
            self._owner.write_failed(self._h, exc)
        finally:
            await self._release()

    async def abort(self) -> None:
        if self._done:
            return
        self._done = True
        await self._cleanup()
        await self._release()

    async def _fail(self, exc: BaseException) -> None:
        self._done = True
        await self._cleanup()
        await self._release()
        self._owner.write_failed(self._h, exc)

    async def _cleanup(self) -> None:
        """Stop the upload and cancel its session; never raises."""
        self._parts = []
        self._send.close()
        with anyio.CancelScope(shield=True):
            task = self._task
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            location, self._location = self._location, None
            if location is not None and self._pusher is not None:
                with (
                    anyio.move_on_after(self._owner.stall_timeout),
                    contextlib.suppress(*UPLOAD_ERRORS),
                ):
                    await self._pusher.cancel_upload(location)

    async def _release(self) -> None:
        settled, self._settled = self._settled, None
        if settled is not None:
            with anyio.CancelScope(shield=True):
                await settled()
