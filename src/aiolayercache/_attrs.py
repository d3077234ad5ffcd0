"""Typed stream attributes: what a stream declares about its bytes, in anyio's manner.

A consumer asks ``stream.extra(StreamAttribute.proven_file, None)`` instead of
probing for attributes; a wrapper that passes bytes through unchanged forwards
its inner stream's ``extra_attributes`` (and may replace one of them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from anyio import TypedAttributeSet, typed_attribute
from anyio.abc import ByteReceiveStream

from ._hash import Hash

__all__ = ["FilledEntry", "ProvenFile", "StreamAttribute"]


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

    Once the stream has ended cleanly, ``committed()`` gives the entry's path
    and the device and inode of the file that holds exactly the bytes the
    stream hashed on their way in (None when the entry was not kept).
    ``durable``: that file was fsynced. A consumer that wants the same bytes
    in a file of its own may hard-link the entry instead of writing them
    again, if what it linked is that inode. When the entry was not kept (a
    full disk), ``reopen`` reads the bytes again from where the cache read
    them, without trying to cache them a second time.
    """

    committed: Callable[[], tuple[str, int, int] | None]
    durable: bool
    reopen: Callable[[], Awaitable[ByteReceiveStream]]


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
