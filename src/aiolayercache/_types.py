"""Value types of the OCI / Docker v2 image model, parsed strictly from raw bytes.

One name space over three rooms: media types and their rules
(``_media_types``), manifests (``_manifest``: Platform, Descriptor,
Manifest, IndexManifest) and configs (``_config``), on strict JSON helpers
(``_json``).
"""

from __future__ import annotations

from ._config import ConfigFile, History, RootFS
from ._json import MAX_DOCUMENT_BYTES
from ._manifest import MAX_INDEX_DEPTH, Descriptor, IndexManifest, Manifest, Platform
from ._media_types import MediaType, is_image_type, is_index_type, is_schema1_type

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_INDEX_DEPTH",
    "ConfigFile",
    "Descriptor",
    "History",
    "IndexManifest",
    "Manifest",
    "MediaType",
    "Platform",
    "RootFS",
    "is_image_type",
    "is_index_type",
    "is_schema1_type",
]
