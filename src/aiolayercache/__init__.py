"""aiolayercache: pull OCI and Docker images with asyncio and cache their layers on disk.

The top level holds the model: :class:`Hash`, the :class:`Layer`,
:class:`Image` and :class:`ImageIndex` protocols, the value types and the
errors. Subpackages hold the rest: ``cache``, ``partial``, ``random``,
``validate``, ``streams``.
"""

from ._errors import (
    AioLayerCacheError,
    CacheDirectoryError,
    CacheError,
    CacheReadError,
    CacheWriteError,
    ChildNotFoundError,
    DecompressionError,
    DigestMismatchError,
    InvalidDigestError,
    LayerNotFoundError,
    ManifestError,
    SizeMismatchError,
    UnsupportedDigestError,
    ValidationError,
)
from ._hash import Hash
from ._protocols import Image, ImageIndex, Layer
from ._types import (
    ConfigFile,
    Descriptor,
    History,
    IndexManifest,
    Manifest,
    MediaType,
    Platform,
    RootFS,
)

__version__ = "0.1.0"

__all__ = [
    "AioLayerCacheError",
    "CacheDirectoryError",
    "CacheError",
    "CacheReadError",
    "CacheWriteError",
    "ChildNotFoundError",
    "ConfigFile",
    "DecompressionError",
    "Descriptor",
    "DigestMismatchError",
    "Hash",
    "History",
    "Image",
    "ImageIndex",
    "IndexManifest",
    "InvalidDigestError",
    "Layer",
    "LayerNotFoundError",
    "Manifest",
    "ManifestError",
    "MediaType",
    "Platform",
    "RootFS",
    "SizeMismatchError",
    "UnsupportedDigestError",
    "ValidationError",
]
