"""A blob's body as a stream: resumed with ``Range`` when cut off, then verified."""

from __future__ import annotations

import logging
import re
import weakref

import aiohttp
import anyio
from anyio.abc import ByteReceiveStream

from .._errors import SizeMismatchError
from .._memory_budget import MemoryBudget, memory_budget
from .._types import Descriptor
from ..streams import CHUNK_SIZE, ChunkStream, VerifyingStream
from ._errors import NET_ERRORS, RemoteError, TransportError, redact
from ._protocols import BlobSource
from ._reference import Reference

__all__ = ["BlobStream", "open_blob"]

log = logging.getLogger("aiolayercache.remote")

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_GATHER = CHUNK_SIZE  # the size of the chunks a blob body is joined into


async def open_blob(source: BlobSource, ref: Reference, desc: Descriptor) -> ByteReceiveStream:
    """A stream of blob ``desc``: verified against digest and size, resumed when cut."""
    stream = BlobStream(source, ref, desc)
    await stream.start()
    return VerifyingStream(stream, desc.digest, desc.size, what=f"blob {ref.context}@{desc.digest}")


class BlobStream(ChunkStream):
    """The body of a blob GET, resumed with ``Range`` from the byte reached when cut off."""

    def __init__(self, source: BlobSource, ref: Reference, desc: Descriptor) -> None:
        super().__init__()
        self._source = source
        self._ref = ref
        self._desc = desc
        self._resp: aiohttp.ClientResponse | None = None
        self.offset = 0  # bytes handed out
        self._skip = 0  # bytes to drop from the current body (a 200 answer to a Range)
        self.resumes = 0
        self._stalled = 0
        self._resumed_at = 0
        self._rest = b""  # received past the last chunk handed out (not yet in ``offset``)
        self._budget: MemoryBudget | None = None
        self._held: list[bytes] = []  # the chunk last handed out, charged to the budget

    async def start(self) -> None:
        self._resp = await self._open(0)

    async def _open(self, offset: int) -> aiohttp.ClientResponse:
        resp = await self._source.open_blob_response(self._ref, self._desc, offset)
        url = redact(resp.url)
        encoded = "Content-Encoding" in resp.headers and resp.headers["Content-Encoding"] not in (
            "identity",
            "",
        )
        if encoded and resp.headers["Content-Encoding"].lower() not in ("gzip", "deflate"):
            resp.release()
            raise RemoteError(
                f"unsupported Content-Encoding {resp.headers['Content-Encoding']!r}",
                url=url,
                status=resp.status,
            )
        self._skip = 0
        if resp.status == 206:
            m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
            if not m or int(m.group(1)) != offset:
                resp.release()
                # A wrong range answer: start again from zero and drop what we have.
                log.debug("blob %s: bad Content-Range; restarting from 0", url)
                resp = await self._source.open_blob_response(self._ref, self._desc, 0)
                if resp.status != 200:
                    resp.release()
                    raise RemoteError("server answers Range requests wrongly", url=url)
                self._skip = offset
        elif offset:
            self._skip = offset  # 200: the server ignored Range
        expected = self._desc.size - offset + self._skip
        if not encoded and resp.content_length is not None and resp.content_length != expected:
            resp.release()
            raise SizeMismatchError(f"blob {url} (Content-Length)", expected, resp.content_length)
        return resp

    async def _resume(self, exc: BaseException | None, reached: int) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        # No progress since the last resume counts as a stall; two in a row end it.
        self._stalled = self._stalled + 1 if reached == self._resumed_at else 0
        self._resumed_at = reached
        self.resumes += 1
        policy = self._source.retry
        what = f"blob {self._ref.context}@{self._desc.digest}"
        if self.resumes > policy.resumes or self._stalled >= 2:
            raise TransportError(
                f"{what} cut off at byte {reached} of {self._desc.size}; gave up after "
                f"{self.resumes - 1} resumes: {exc}"
            ) from exc
        log.debug("%s cut off at byte %d (%s); resuming", what, reached, exc)
        await anyio.sleep(policy.delay(max(0, self._stalled - 1)) if self._stalled else 0)
        self._resp = await self._open(reached)

    async def _next(self) -> bytes | None:
        # Room in the loop's memory budget first: while it is full the bytes stay in the
        # kernel. The chunk read stays charged (held) until the next call, while it goes
        # to the lanes and files that take it (they charge it once more for free).
        budget = self._budget
        if budget is None:
            budget = self._budget = memory_budget()
            weakref.finalize(self, _let_go, budget, self._held)
        if self._held:
            budget.unhold(self._held.pop())
        n = min(_GATHER, max(0, self._desc.size - self.offset))
        if n:
            await budget.reserve(n)
        try:
            chunk = await self._gather()
        except BaseException:
            if n:
                budget.unreserve(n)
            raise
        if chunk is None:
            if n:
                budget.unreserve(n)
            return None
        budget.hold(chunk, n)
        self._held.append(chunk)
        return chunk

    async def _gather(self) -> bytes | None:
        # Gather what the socket hands over (readchunk: no copy) and join it once per
        # chunk: every byte is copied once, not twice.
        parts: list[bytes] = []
        got = 0
        size = self._desc.size

        def take() -> bytes:
            nonlocal parts, got
            out = parts[0] if len(parts) == 1 else b"".join(parts)
            self.offset += got
            parts, got = [], 0
            return out

        if self._rest:
            parts.append(self._rest)
            got = len(self._rest)
            self._rest = b""
        while got < _GATHER:
            resp = self._resp
            if resp is None:
                await self._resume(None, self.offset + got)
                continue
            try:
                # One buffered piece as it came (readany would join all buffered first).
                data, chunk_end = await resp.content.readchunk()
            except NET_ERRORS as exc:
                if isinstance(exc, RemoteError):
                    raise
                out = take()
                await self._resume(exc, self.offset)
                if out:
                    return out
                continue
            if not data and chunk_end:
                continue  # the end of an HTTP chunk (chunked transfer encoding), not of the body
            if not data:
                if self.offset + got < size:
                    out = take()
                    await self._resume(ConnectionError("body ended early"), self.offset)
                    if out:
                        return out
                    continue
                break
            if self._skip:
                drop = min(self._skip, len(data))
                self._skip -= drop
                data = data[drop:]
                if not data:
                    continue
            if got + len(data) > _GATHER:
                # Exactly _GATHER out: a bigger chunk would be cut by ``receive`` into a
                # copy of its first part and a view keeping the whole alive.
                self._rest = data[_GATHER - got :]
                data = data[: _GATHER - got]
            parts.append(data)
            got += len(data)
        return take() if got else None

    async def _aclose(self) -> None:
        if self._held and self._budget is not None:
            self._budget.unhold(self._held.pop())
        if self._resp is not None:
            self._resp.close()
            self._resp = None


def _let_go(budget: MemoryBudget, held: list[bytes]) -> None:
    """Finalizer of a stream dropped without ``aclose``: its hold goes back to the budget."""
    if held:
        budget.unhold(held.pop())
