"""Reading fleet entries: layers that stream a blob of the fleet repository, verified.

A fleet is a shared, remote, possibly misbehaving cache, so a read from it
never fails a pull that the origin could serve:

- an entry that cannot be opened (its blob is gone, its size is wrong, the
  registry errs or stalls) is a miss (:class:`LayerNotFoundError`), and the
  caller reads the origin; an entry that is wrong for good is dropped (its
  tag deleted), a fleet that errs or stalls is skipped for a while;
- bytes that fail their digest drop the entry (the stream raises, never
  ends cleanly); a stream that stops mid-way raises
  :class:`~aiolayercache.CacheReadError` after marking the fleet down, so a
  second read (the layout and tarball writers make one) goes to the origin;
- every receive is bounded by the fleet's ``stall_timeout``;
- an entry tagged as an uncompressed tar is served only as one: asked for a
  compressed blob, it is a miss (a wrong ``kind`` cannot turn into a pull
  that fails).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import anyio
from anyio.abc import ByteReceiveStream

from .. import partial
from .._errors import AioLayerCacheError, CacheReadError, DigestMismatchError, LayerNotFoundError
from .._hash import Hash
from .._protocols import Layer
from .._types import Descriptor
from ..remote import Client, RemoteError
from ..remote._reference import Reference
from ..streams import VerifyingStream
from ._entries import EntryInfo

__all__ = ["Store", "fleet_layer"]

# What a fleet that cannot serve an entry raises.
READ_ERRORS = (AioLayerCacheError, OSError, TimeoutError)


class Store(Protocol):
    """What reading an entry asks of the fleet cache."""

    repo: Reference
    label: str
    stall_timeout: float

    async def client(self) -> Client: ...

    async def drop(self, h: Hash, why: str) -> None:
        """Delete entry ``h``'s tag: its bytes are wrong for good."""
        ...

    def served(self, size: int) -> None:
        """Count an entry opened for reading."""
        ...

    def unreadable(self, exc: BaseException, *, down: bool) -> None:
        """Count a failed read (warn about the first); ``down``: skip the fleet a while."""
        ...


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def open_entry(store: Store, desc: Descriptor) -> ByteReceiveStream:
    """A verified stream of entry ``desc``; a miss when the fleet cannot serve it."""
    h = desc.digest
    c = await store.client()
    try:
        with anyio.fail_after(store.stall_timeout):
            inner = await c.open_blob(store.repo, desc)
    except READ_ERRORS as exc:
        gone = isinstance(exc, DigestMismatchError) or (
            isinstance(exc, RemoteError) and exc.status == 404
        )
        if gone:  # no blob behind the tag, or not the size it says: wrong for good
            await store.drop(h, _why(exc))
        else:
            store.unreadable(exc, down=True)
        raise LayerNotFoundError(f"{h}: {store.repo.context} could not serve it") from exc

    async def condemn() -> None:
        await store.drop(h, "its bytes failed their digest")

    store.served(desc.size)

    verified = VerifyingStream(
        inner,
        h,
        desc.size,
        what=f"fleet entry {store.repo.context}@{h}",
        on_mismatch=condemn,
        from_cache=True,
        tier=store.label,
    )
    return _FleetStream(verified, store, h)


class _FleetStream(ByteReceiveStream):
    """A fleet entry's stream: each receive bounded; a stop mid-way is a CacheReadError."""

    def __init__(self, inner: ByteReceiveStream, store: Store, h: Hash) -> None:
        self._inner = inner
        self._store = store
        self._h = h

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._inner.extra_attributes

    async def receive(self, max_bytes: int = 65536) -> bytes:
        try:
            with anyio.fail_after(self._store.stall_timeout):
                return await self._inner.receive(max_bytes)
        except (DigestMismatchError, anyio.EndOfStream):
            raise  # (a mismatch dropped the entry already; the writers read it again)
        except READ_ERRORS as exc:
            self._store.unreadable(exc, down=True)
            with anyio.CancelScope(shield=True):
                await self._inner.aclose()
            raise CacheReadError(
                f"fleet entry {self._store.repo.context}@{self._h} stopped: {_why(exc)}"
            ) from exc

    async def aclose(self) -> None:
        await self._inner.aclose()


class _FleetTar(partial.UncompressedLayer):
    """An entry tagged as an uncompressed tar: served as one, never as a compressed blob."""

    async def compressed(self) -> ByteReceiveStream:
        raise LayerNotFoundError(f"{await self.diff_id()} is a tar in the fleet, not a blob")


def fleet_layer(store: Store, info: EntryInfo) -> Layer:
    """The layer of entry ``info``: opened (and verified) only when read."""
    desc = Descriptor(media_type=info.media_type, size=info.size, digest=info.digest)

    async def opener() -> ByteReceiveStream:
        return await open_entry(store, desc)

    if info.kind == "uncompressed":
        return _FleetTar(opener, diff_id=info.digest, media_type=info.media_type)
    return partial.compressed_layer(
        opener, digest=info.digest, size=info.size, media_type=info.media_type
    )
