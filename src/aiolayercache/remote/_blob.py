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
        self._fed = 0  # bytes taken from the current response's body
        self._budget: MemoryBudget | None = None
        self._held: list[bytes] = []  # the chunk last handed out, charged to the budget

    async def start(self) -> None:
        self._resp = await self._open(0)
        self._fed = 0

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
        self._fed = 0

    async def _next(self) -> bytes | None:
        # Memory: the chunk handed out last stays charged to the loop's budget (held)
        # until now, while it travels to the lanes and files that take it (they charge
        # it once more for free). A chunk waits for room in the budget after its first
        # piece came and before any more is taken from aiohttp, and then takes only what
        # aiohttp has buffered: no room is held while waiting on the network (a stalled
        # server holds up nobody), and while the budget is full the bytes wait in aiohttp
        # and the kernel.
        budget = self._budget
        if budget is None:
            budget = self._budget = memory_budget()
            weakref.finalize(self, _let_go, budget, self._held)
        if self._held:
            budget.unhold(self._held.pop())
        if not self._rest:
            first = await self._first_piece()
            if first is None:
                return None
            self._rest = first  # (kept if cancelled below)
        n = max(len(self._rest), min(_GATHER, self._desc.size - self.offset))
        await budget.reserve(n)
        parts, self._rest = [self._rest], b""
        got = len(parts[0])
        while got < _GATHER:
            piece = await self._buffered_piece()
            if piece is None:
                break
            if got + len(piece) > _GATHER:
                # At most _GATHER out: a bigger chunk would be cut by ``receive`` into a
                # copy of its first part and a view keeping the whole alive.
                self._rest = piece[_GATHER - got :]
                piece = piece[: _GATHER - got]
            parts.append(piece)
            got += len(piece)
        # Gathered as the socket handed it over (readchunk: no copy), joined once.
        chunk = parts[0] if len(parts) == 1 else b"".join(parts)
        self.offset += got
        budget.hold(chunk, n)
        self._held.append(chunk)
        return chunk

    def _take_skip(self, data: bytes) -> bytes:
        if self._skip:
            drop = min(self._skip, len(data))
            self._skip -= drop
            data = data[drop:]
        return data

    async def _first_piece(self) -> bytes | None:
        """The next bytes of the body, waiting on the network (and resuming) as needed."""
        while True:
            resp = self._resp
            if resp is None:
                await self._resume(None, self.offset)
                continue
            try:
                data, chunk_end = await resp.content.readchunk()
            except NET_ERRORS as exc:
                if isinstance(exc, RemoteError):
                    raise
                await self._resume(exc, self.offset)
                continue
            self._fed += len(data)
            if not data:
                if chunk_end:
                    continue  # the end of an HTTP chunk (chunked encoding), not of the body
                if self.offset < self._desc.size:
                    await self._resume(ConnectionError("body ended early"), self.offset)
                    continue
                return None
            data = self._take_skip(data)
            if data:
                return data

    async def _buffered_piece(self) -> bytes | None:
        """A piece aiohttp holds already (returned without waiting), or None."""
        while self._resp is not None:
            content = self._resp.content
            if content.total_bytes <= self._fed:
                return None  # nothing buffered: hand out what we have rather than wait
            try:
                data, _ = await content.readchunk()
            except NET_ERRORS as exc:
                if isinstance(exc, RemoteError):
                    raise
                return None  # the next chunk's first read meets it again, and resumes
            self._fed += len(data)
            data = self._take_skip(data)
            if data:
                return data
        return None

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
