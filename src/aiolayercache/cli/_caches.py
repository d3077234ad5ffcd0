"""The layer cache a command reads through: the local directory, the fleet, or both."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

import anyio

from .. import Hash
from ..cache import Cache, FilesystemCache, tiered
from ..remote import Client, InvalidReferenceError, Reference
from ._args import EXIT_OK, FLEET_ENV, MAX_SIZE_ENV, UsageError, parse_size
from ._cache_cmd import default_cache_dir

if TYPE_CHECKING:  # the fleet is imported when a command uses one
    from ..fleet import EntryInfo, RegistryCache

__all__ = ["fleet_ls", "fleet_repo", "layer_cache"]


def max_size(args: argparse.Namespace) -> int | None:
    """``--cache-max-size``, else ``$AIOLAYERCACHE_CACHE_MAX_SIZE``, else None."""
    if args.cache_max_size is not None:
        n, where = int(args.cache_max_size), "--cache-max-size"
    else:
        text = os.environ.get(MAX_SIZE_ENV, "")
        if not text:
            return None
        try:
            n, where = parse_size(text), f"${MAX_SIZE_ENV}"
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"${MAX_SIZE_ENV}: {exc}") from None
    if n < 1:
        raise UsageError(f"{where} must be at least one byte")
    return n


def layer_cache(
    args: argparse.Namespace, client: Client, *, local: bool = True
) -> tuple[Cache | None, RegistryCache | None]:
    """The cache to read through (None: none) and the fleet tier in it, if any.

    ``--no-cache`` drops the local tier only: with ``--fleet`` the fleet is read alone.
    """
    fs = None
    if local:
        fs = FilesystemCache(args.cache_dir or default_cache_dir(), max_bytes=max_size(args))
    repo = fleet_repo(args)
    fleet = None
    if repo is not None:
        from ..fleet import RegistryCache

        fleet = RegistryCache(repo, client=client)
    if fs is not None and fleet is not None:
        return tiered(fs, fleet), fleet
    return (fs or fleet), fleet


def fleet_repo(args: argparse.Namespace) -> Reference | None:
    text = args.fleet if args.fleet is not None else os.environ.get(FLEET_ENV, "")
    if not text:
        return None
    try:
        ref = Reference.parse(text)
    except InvalidReferenceError as exc:
        raise UsageError(f"--fleet {text!r} is not a registry repository: {exc}") from None
    if ref.digest is not None or (ref.tag not in (None, "latest")):
        raise UsageError(f"--fleet names a repository (REGISTRY/REPO), not an image: {text!r}")
    return ref


async def fleet_ls(args: argparse.Namespace) -> int:
    """``cache ls --fleet REPO``: each entry's hash, size and kind, from its manifest."""
    from ..fleet import RegistryCache

    repo = fleet_repo(args)
    assert repo is not None
    limiter = anyio.CapacityLimiter(8)
    async with Client(insecure=args.insecure) as client:
        fleet = RegistryCache(repo, client=client, claims=False, lookup_timeout=30)
        hashes = await fleet.entries()
        infos: list[EntryInfo | None] = [None] * len(hashes)

        async def one(i: int, h: Hash) -> None:
            async with limiter:
                infos[i] = await fleet.lookup(h)

        async with anyio.create_task_group() as tg:
            for i, h in enumerate(hashes):
                tg.start_soon(one, i, h)
    for info in infos:
        if info is not None:  # (deleted since the tags were listed)
            print(f"{info.digest}  {info.size:>12}  {info.kind}")
    return EXIT_OK
