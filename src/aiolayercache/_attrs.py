"""Typed stream attributes: what a stream declares about its bytes, in anyio's manner.

A consumer asks ``stream.extra(StreamAttribute.proven_file, None)`` instead of
probing for attributes; a wrapper that passes bytes through unchanged forwards
its inner stream's ``extra_attributes`` (and may replace one of them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

from anyio import TypedAttributeSet, typed_attribute
from anyio.abc import ByteReceiveStream

from ._hash import Hash

__all__ = ["LINK_WANTED", "FilledEntry", "ProvenFile", "StreamAttribute"]


def _ignore(n: int) -> None:
    return None


@dataclass(frozen=True, slots=True)
class ProvenFile:
    """An open regular file whose ``size`` bytes hashed to ``digest`` when they were proven.

    A consumer may copy the file by descriptor (in the kernel) instead of
    reading the stream, but the proof is only as good as the file's size and
    mtime: it must hash what lands before it trusts it, and call
    :meth:`condemn` when that does not match (the owner then removes the
    entry, so the next read fetches it again). ``consumed`` is called with the
    number of bytes copied that way, so progress counters stay right.
    """

    fd: int
    digest: Hash
    size: int
    condemn: Callable[[], Awaitable[None]]
    consumed: Callable[[int], None] = field(default=_ignore)


@dataclass(frozen=True, slots=True)
class FilledEntry:
    """The cache entry a stream fills as it is read.

    Once the stream has ended cleanly (before it is closed), ``take()`` hands
    over a descriptor of the very file the stream's bytes went into as they
    were hashed (None when the entry was not kept); the caller closes it. A
    cache offers this only to a reader that set :data:`LINK_WANTED` while
    opening the stream. ``durable``: that file was
    fsynced. A consumer that wants the same bytes in a file of its own may
    hard-link that descriptor's inode instead of writing them again (by
    descriptor, never by the entry's path, which may name another file by
    then). When the entry was not kept (a full disk), ``reopen`` reads the
    bytes again from where the cache read them, without caching them twice.
    """

    take: Callable[[], int | None]
    durable: bool
    reopen: Callable[[], Awaitable[ByteReceiveStream]]


#: Set by a reader that would link a cache entry it fills (see :class:`FilledEntry`),
#: while it opens the stream: only then does the cache keep the committed file open.
LINK_WANTED: ContextVar[bool] = ContextVar("aiolayercache_link_wanted", default=False)


class StreamAttribute(TypedAttributeSet):
    """Attributes of the byte streams of this library (see ``ByteReceiveStream.extra``)."""

    #: the stream raises rather than end cleanly unless its bytes hash to this digest
    #: (and number this many bytes, when not None)
    verifies: tuple[Hash, int | None] = typed_attribute()
    #: the stream reads a proven cache entry that may be copied by descriptor
    proven_file: ProvenFile = typed_attribute()
    #: True when the bytes come from a cache entry, False when from upstream
    from_cache: bool = typed_attribute()
    #: the cache entry the stream fills as it is read (a link may stand in for a copy)
    filled_entry: FilledEntry = typed_attribute()
    #: the cache tier (a ``label``: "fleet", ...) the bytes come from, when a cache behind
    #: the first one serves them; kept by the streams that fill faster tiers from them
    tier: str = typed_attribute()
