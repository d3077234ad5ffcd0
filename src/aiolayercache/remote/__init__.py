"""Pull from OCI distribution registries with aiohttp.

``await remote.image("alpine:3.20")`` returns an :class:`~aiolayercache.Image`
whose layers stream straight from the registry, verified as they stream;
wrap it with :func:`aiolayercache.cache.image` to pull through a cache.
Pass ``client=`` to share one :class:`Client` (one pooled session, one
token cache) across pulls; without it the event loop's shared client is used.
Pulls go through the mirrors of ``Client(mirrors=...)`` and of the containers
``registries.conf`` (:class:`BlockedError` for a blocked name,
:class:`RegistriesConfError` for a bad file). Credentials are looked up
when a registry asks for them, in skopeo's order (:func:`auth_files`;
:class:`CredentialHelperError` when a credential helper fails).
"""

from __future__ import annotations

from .._errors import PlatformNotFoundError
from .._hash import Hash
from .._platform import host_platform, platform_matches
from .._protocols import Image, ImageIndex, Layer
from .._types import Platform
from ._auth import Credentials, load_docker_config, parse_challenges
from ._client import Client
from ._credentials import auth_files
from ._default import default_client
from ._descriptor import RemoteDescriptor
from ._errors import RemoteError, TransportError, UnauthorizedError
from ._helpers import CredentialHelperError
from ._mirrors import BlockedError
from ._reference import InvalidReferenceError, Reference
from ._registries_conf import RegistriesConfError
from ._retry import RetryPolicy, parse_retry_after
from ._write import PushStats

__all__ = [
    "BlockedError",
    "Client",
    "CredentialHelperError",
    "Credentials",
    "InvalidReferenceError",
    "PlatformNotFoundError",
    "PushStats",
    "Reference",
    "RegistriesConfError",
    "RemoteDescriptor",
    "RemoteError",
    "RetryPolicy",
    "TransportError",
    "UnauthorizedError",
    "auth_files",
    "default_client",
    "delete",
    "get",
    "host_platform",
    "image",
    "index",
    "load_docker_config",
    "parse_challenges",
    "parse_retry_after",
    "platform_matches",
    "tag",
    "write",
    "write_layer",
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


async def write(
    ref: str | Reference,
    target: Image | ImageIndex,
    *,
    client: Client | None = None,
    concurrency: int = 4,
    stats: PushStats | None = None,
) -> Hash:
    """Push an image or a whole index to ``ref``; returns the digest of the manifest put."""
    c = client or await default_client()
    return await c.write(ref, target, concurrency=concurrency, stats=stats)


async def write_layer(repo: str | Reference, layer: Layer, *, client: Client | None = None) -> None:
    """Push one layer's blob to the repository ``repo`` names."""
    await (client or await default_client()).write_layer(repo, layer)


async def tag(ref: str | Reference, new_tag: str, *, client: Client | None = None) -> None:
    """Tag the manifest ``ref`` names as ``new_tag`` in its repository."""
    await (client or await default_client()).tag(ref, new_tag)


async def delete(ref: str | Reference, *, client: Client | None = None) -> None:
    """Delete the manifest ``ref`` names from its registry."""
    await (client or await default_client()).delete(ref)
