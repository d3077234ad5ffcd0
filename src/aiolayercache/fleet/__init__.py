"""The fleet: one layer cache for many machines, kept in an OCI registry.

:class:`RegistryCache` is a :class:`~aiolayercache.cache.Cache` on one
repository of a registry that already scales, replicates and expires data
(distribution on S3 or GCS, Harbor, Zot, a cloud registry). Put it behind a
local cache with :func:`aiolayercache.cache.tiered`::

    local = cache.FilesystemCache("/var/cache/layers")
    fleet = RegistryCache("cache.example:5000/layer-cache", client=client)
    img = cache.image(await client.image(ref), cache.tiered(local, fleet))

The format (a blob per entry, a manifest tagged ``sha256-<hex>`` keeping it)
is described in ``_entries``; docs/FLEET.md says how to run it for real.
"""

from __future__ import annotations

from ._entries import EntryInfo
from ._store import RegistryCache

__all__ = ["EntryInfo", "RegistryCache"]
