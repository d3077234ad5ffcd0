"""The layer cache a command reads through: the local directory, the fleet, or both."""

from __future__ import annotations

import argparse
import os

from ..cache import Cache, FilesystemCache, tiered
from ..fleet import RegistryCache
from ..remote import Client, InvalidReferenceError, Reference
from ._args import FLEET_ENV, UsageError
from ._cache_cmd import default_cache_dir

__all__ = ["fleet_repo", "layer_cache"]


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


def layer_cache(
    args: argparse.Namespace, client: Client, *, local: bool = True
) -> tuple[Cache | None, RegistryCache | None]:
    """The cache to read through (None: none) and the fleet tier in it, if any.

    ``--no-cache`` drops the local tier only: with ``--fleet`` the fleet is read alone.
    """
    fs = FilesystemCache(args.cache_dir or default_cache_dir()) if local else None
    repo = fleet_repo(args)
    fleet = RegistryCache(repo, client=client) if repo is not None else None
    if fs is not None and fleet is not None:
        return tiered(fs, fleet), fleet
    return (fs or fleet), fleet
