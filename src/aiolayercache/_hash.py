"""``Hash``: a validated ``algorithm:hex`` digest, safe to use as a file name."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._errors import InvalidDigestError, UnsupportedDigestError

if TYPE_CHECKING:
    from hashlib import _Hash as Hasher

__all__ = ["Hash"]

# The algorithms we can compute, with the exact hex length of each.
_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}
# OCI image-spec grammar for an algorithm: lowercase components joined by + . _ -
_ALGORITHM_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*")
_HEX_RE = re.compile(r"[0-9a-f]+")


def _check(algorithm: object, hex_: object) -> None:
    if not isinstance(algorithm, str) or not isinstance(hex_, str):
        raise InvalidDigestError(f"digest parts must be strings: {algorithm!r}:{hex_!r}")
    if not _ALGORITHM_RE.fullmatch(algorithm):
        raise InvalidDigestError(f"invalid digest algorithm {algorithm!r}")
    length = _ALGORITHMS.get(algorithm)
    if length is None:
        raise UnsupportedDigestError(f"unsupported digest algorithm {algorithm!r}")
    if len(hex_) != length or not _HEX_RE.fullmatch(hex_):
        raise InvalidDigestError(
            f"invalid {algorithm} digest {hex_[:140]!r}: want {length} lowercase hex digits"
        )


@dataclass(frozen=True, slots=True, order=True)
class Hash:
    """A content digest. Construction validates, so every ``Hash`` is well formed.

    Only known algorithms (``sha256``, ``sha512``) with lowercase hex of the
    exact length are accepted; anything else raises :class:`InvalidDigestError`.
    """

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        _check(self.algorithm, self.hex)

    @classmethod
    def parse(cls, s: str) -> Hash:
        """Parse ``algorithm:hex``; raise :class:`InvalidDigestError` on anything else."""
        if not isinstance(s, str):
            raise InvalidDigestError(f"digest must be a string, not {type(s).__name__}")
        algorithm, sep, hex_ = s.partition(":")
        if not sep:
            raise InvalidDigestError(f"invalid digest {s[:200]!r}: no ':'")
        return cls(algorithm, hex_)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Hash:
        """The digest of ``data``."""
        if algorithm not in _ALGORITHMS:
            raise UnsupportedDigestError(f"unsupported digest algorithm {algorithm!r}")
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Hasher:
        """A fresh hashlib object for this digest's algorithm."""
        return hashlib.new(self.algorithm)

    @property
    def filename(self) -> str:
        """The cache file name, as go-containerregistry's cache names it."""
        sep = "-" if os.name == "nt" else ":"
        return f"{self.algorithm}{sep}{self.hex}"

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"
