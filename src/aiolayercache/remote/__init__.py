"""Pull from OCI distribution registries with aiohttp.

``await remote.image("alpine:3.20")`` returns an :class:`~aiolayercache.Image`
whose layers stream straight from the registry, verified as they stream;
wrap it with :func:`aiolayercache.cache.image` to pull through a cache.
Pass ``client=`` to share one :class:`Client` (one pooled session, one
token cache) across pulls; without it the event loop's shared client is used.
"""

from __future__ import annotations

from .._errors import PlatformNotFoundError
from .._platform import host_platform, platform_matches
from .._protocols import Image, ImageIndex
from .._types import Platform
from ._auth import Credentials, load_docker_config, parse_challenges
from ._client import Client
from ._default import default_client
from ._descriptor import RemoteDescriptor
from ._errors import RemoteError, TransportError, UnauthorizedError
from ._reference import InvalidReferenceError, Reference
from ._retry import RetryPolicy, parse_retry_after

__all__ = [
    "Client",
    "Credentials",
    "InvalidReferenceError",
    "PlatformNotFoundError",
    "Reference",
    "RemoteDescriptor",
    "RemoteError",
    "RetryPolicy",
    "TransportError",
    "UnauthorizedError",
    "default_client",
    "get",
    "host_platform",
    "image",
    "index",
    "load_docker_config",
    "parse_challenges",
    "parse_retry_after",
    "platform_matches",
]


async def get(ref: str | Reference, *, client: Client | None = None) -> RemoteDescriptor:
    """The manifest or index ``ref`` names, as a descriptor that can become either."""
    return await (client or await default_client()).get(ref)


async def image(
    ref: str | Reference,
    *,
    client: Client | None = None,
    platform: Platform | str | None = None,
) -> Image:
    """The image ``ref`` names; an index resolves to ``platform`` (default: this host's)."""
    return await (client or await default_client()).image(ref, platform=platform)


async def index(ref: str | Reference, *, client: Client | None = None) -> ImageIndex:
    """The index ``ref`` names."""
    return await (client or await default_client()).index(ref)
