"""What reading and writing OCI layouts share: paths that never leave the layout,
``index.json``, and the layout's error."""

from __future__ import annotations

import os

from ._errors import AioLayerCacheError, ManifestError
from ._hash import Hash
from ._types import MAX_DOCUMENT_BYTES, IndexManifest

__all__ = ["REF_NAME", "LayoutError", "blob_path", "inside", "read_index_json"]

REF_NAME = "org.opencontainers.image.ref.name"


class LayoutError(AioLayerCacheError):
    """A layout is missing a file, has one it should not trust, or cannot be written."""


def blob_path(root: str, h: Hash) -> str:
    # A Hash is validated at construction: neither part holds a separator or "..".
    return os.path.join(root, "blobs", h.algorithm, h.hex)


def inside(root: str, path: str) -> str:
    """``path`` resolved; a :class:`LayoutError` if it leaves ``root`` (a symlink out)."""
    real = os.path.realpath(path)
    if real != root and not real.startswith(root + os.sep):
        raise LayoutError(f"{path} resolves outside the layout {root}")
    return real


def read_index_json(root: str) -> bytes:
    path = os.path.join(root, "index.json")
    inside(root, path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_DOCUMENT_BYTES + 1)
    except FileNotFoundError:
        raise LayoutError(f"{path}: no index.json: {root} is not an OCI layout") from None
    except OSError as exc:
        raise LayoutError(f"{path}: cannot read: {exc.strerror}") from exc
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise ManifestError(f"{path}: over the {MAX_DOCUMENT_BYTES}-byte cap")
    try:
        IndexManifest.parse(raw)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from exc
    return raw
