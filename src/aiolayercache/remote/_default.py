"""The client the module helpers use when the caller passes none: one per event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from ._client import Client

__all__ = ["default_client"]


# Per event loop, the client used when the caller passes none; closed at loop shutdown.
_DEFAULTS: dict[int, Client] = {}
_HOLDERS: dict[int, AsyncGenerator[None, None]] = {}


async def _holder(client: Client, key: int) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        _DEFAULTS.pop(key, None)
        _HOLDERS.pop(key, None)
        await client.aclose()


async def default_client() -> Client:
    """The shared client of the running event loop (closed when the loop shuts down)."""
    loop = asyncio.get_running_loop()
    key = id(loop)
    client = _DEFAULTS.get(key)
    if client is None or client.closed:
        client = Client()
        _DEFAULTS[key] = client
        holder = _holder(client, key)
        await holder.__anext__()
        _HOLDERS[key] = holder  # asyncio.run's shutdown_asyncgens closes it, and the client
    return client
