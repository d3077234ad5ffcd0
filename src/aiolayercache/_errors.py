"""The error types of aiolayercache: one base, typed leaves that name what failed."""

from __future__ import annotations

__all__ = [
    "AioLayerCacheError",
    "CacheDirectoryError",
    "CacheError",
    "CacheWriteError",
    "ChildNotFoundError",
    "DecompressionError",
    "DigestMismatchError",
    "InvalidDigestError",
    "CacheReadError",
    "LayerNotFoundError",
    "ManifestError",
    "PlatformNotFoundError",
    "SizeMismatchError",
    "UnsupportedDigestError",
    "ValidationError",
]


class AioLayerCacheError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidDigestError(AioLayerCacheError, ValueError):
    """A digest string is not ``algorithm:hex`` of a known algorithm and exact length."""


class UnsupportedDigestError(InvalidDigestError):
    """A well-formed digest whose algorithm this package cannot compute."""


class DigestMismatchError(AioLayerCacheError):
    """Bytes read do not hash (or count) to what their descriptor promised.

    ``what`` names the stream (a digest, a path, a URL), ``expected`` and
    ``actual`` are the digests (or sizes, for :class:`SizeMismatchError`).
    """

    def __init__(self, what: str, expected: object, actual: object) -> None:
        self.what = what
        self.expected = expected
        self.actual = actual
        super().__init__(f"{what}: expected {expected}, got {actual}")


class SizeMismatchError(DigestMismatchError):
    """A stream ended short of, or ran past, its promised size."""

    def __init__(self, what: str, expected: object, actual: object) -> None:
        super().__init__(what, f"{expected} bytes", f"{actual} bytes")
        self.expected = expected
        self.actual = actual


class LayerNotFoundError(AioLayerCacheError, LookupError):
    """No layer with this hash is in the cache."""


class ChildNotFoundError(AioLayerCacheError, LookupError):
    """An index has no child manifest with this digest."""


class ManifestError(AioLayerCacheError, ValueError):
    """A manifest, index or config document is malformed, ambiguous or unsupported."""


class PlatformNotFoundError(AioLayerCacheError, LookupError):
    """An index has no image for the asked platform; the message lists what it has."""


class ValidationError(AioLayerCacheError):
    """``validate.image`` / ``validate.index`` found problems; ``findings`` lists each."""

    def __init__(self, what: str, findings: list[str]) -> None:
        self.what = what
        self.findings = findings
        super().__init__(f"{what}: " + "; ".join(findings))


class CacheError(AioLayerCacheError):
    """Base of cache failures."""


class CacheDirectoryError(CacheError):
    """The cache directory is misconfigured: not a directory, or cannot be created."""


class CacheWriteError(CacheError):
    """A cache entry could not be written (disk full, quota, I/O error)."""


class CacheReadError(CacheError):
    """A cache could not finish serving an entry it had (a fleet that stopped answering).

    The bytes handed out so far were right but are not all: read the layer
    again, and the cache (which now knows) sends the reader elsewhere. The
    layout and tarball writers do so once, as for a :class:`DigestMismatchError`.
    """


class DecompressionError(AioLayerCacheError):
    """A compressed stream is corrupt or ends before its end marker."""


def first_error(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error of a task group's exception group that is not a cancellation."""
    import anyio

    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        else:
            leaves.append(e)

    walk(eg)
    cancelled = anyio.get_cancelled_exc_class()
    for e in leaves:
        if not isinstance(e, cancelled):
            return e
    return leaves[0] if leaves else eg
