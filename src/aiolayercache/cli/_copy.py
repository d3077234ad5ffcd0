"""``aiolayercache copy`` (and ``push``, its short form): one image or index into a registry.

SRC is read as ``pull`` reads it (``_sources``), through the layer cache when
it is a registry, and written with :meth:`Client.write` as it is: no
conversion, so DST gets SRC's digest. The push skips blobs the repository
has, mounts those of another repository of the same registry, uploads the
rest, and puts the manifest DST names last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

from .. import Hash, Image, ImageIndex, cache
from ..cache import Cache
from ..remote import Client, InvalidReferenceError, PushStats, Reference
from ._args import EXIT_FAILED, EXIT_OK, UsageError, human
from ._caches import layer_cache
from ._progress import ObservedImage, ObservedIndex, Reporter
from ._sources import Source, check_platform, failure, parse_source, resolve

__all__ = ["CopyState", "copy", "interrupted", "local_source", "parse_dest", "summary"]


@dataclass
class CopyState:
    """What a copy did so far: the push's counts, and the digest once DST names it."""

    push: PushStats = field(default_factory=PushStats)
    digest: Hash | None = None


def local_source(path: str) -> str:
    """``push``'s PATH as a source: a directory is ``oci:DIR``, a file ``docker-archive:FILE``.

    ``DIR:NAME`` (an existing directory, then a ref name) is ``oci:DIR:NAME``.
    A path already spelled ``oci:…`` or ``docker-archive:…`` is taken as it is.
    """
    if path.startswith(("oci:", "docker-archive:")):
        return path
    if os.path.isdir(path):
        return f"oci:{path}"
    if os.path.isfile(path):
        return f"docker-archive:{path}"
    head, sep, _ = path.partition(":")
    if sep and head and os.path.isdir(head):
        return f"oci:{path}"
    raise UsageError(
        f"{path!r} is neither a directory (an OCI layout, DIR[:NAME]) nor a file "
        "(a docker archive); to copy from a registry, use copy"
    )


def parse_dest(text: str) -> Reference:
    """DST: a registry reference (``docker://`` allowed); anything else is a usage error."""
    if text.startswith(("oci:", "docker-archive:")):
        raise UsageError(
            f"DST {text!r}: copy writes to a registry; to write a layout or an archive, use pull"
        )
    ref = text[len("docker://") :] if text.startswith("docker://") else text
    try:
        return Reference.parse(ref)
    except InvalidReferenceError as exc:
        raise UsageError(f"DST: {exc}") from None


async def _target(
    src: Source,
    args: argparse.Namespace,
    client: Client,
    rep: Reporter,
    fs: Cache | None,
) -> Image | ImageIndex:
    """The one image or index of ``src`` (observed, and cached when ``fs`` is given)."""
    items = await resolve(src, args, client)
    if len(items) != 1:
        names = ", ".join(name for name, _, _ in items)
        how = "copy takes one"
        if src.kind == "oci":
            how = "name one as DIR:NAME" if args.command == "push" else "name one as oci:DIR:NAME"
        raise UsageError(f"{src.text} holds {len(items)} images ({names}); {how}")
    _, t, single = items[0]
    if isinstance(t, Image):
        img = ObservedImage(cache.image(t, fs) if fs is not None else t, rep)
        if single and args.platform:
            await check_platform(img, args.platform)
        return img
    return ObservedIndex(cache.image_index(t, fs) if fs is not None else t, rep)


async def copy(args: argparse.Namespace, rep: Reporter, state: CopyState) -> int:
    text = local_source(args.source) if args.command == "push" else args.source
    src = parse_source(text)
    dst = parse_dest(args.dest)
    if args.jobs < 1:
        raise UsageError("-j must be at least 1")
    # Only a registry is worth caching: a layout or an archive is already on this disk.
    async with Client(
        insecure=args.insecure, registries_conf=args.registries_conf, cert_dir=args.cert_dir
    ) as client:
        fs, fleet = None, None
        if src.kind == "registry":
            fs, fleet = layer_cache(args, client, local=not args.no_cache)
            rep.fleet = fleet is not None
        try:
            try:
                target = await _target(src, args, client, rep, fs)
            except UsageError:
                raise
            except Exception as exc:
                if args.debug:
                    raise
                print(
                    f"aiolayercache: copy failed: {failure(src, exc)} ({type(exc).__name__})",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            try:
                digest = await client.write(dst, target, concurrency=args.jobs, stats=state.push)
            except Exception as exc:
                if args.debug:
                    raise
                print(
                    f"aiolayercache: copy of {src.text} to {args.dest} failed: "
                    f"{type(exc).__name__}: {exc}",
                    file=sys.stderr,
                )
                return EXIT_FAILED
        finally:
            if fleet is not None:
                await fleet.flush()  # the uploads that finish behind the reads
    state.digest = digest
    rep.image_done(f"{src.text} to {args.dest}", digest)
    return EXIT_OK


def interrupted(dest: str, state: CopyState) -> str:
    """What an interrupted copy left at ``dest``, in words."""
    if state.digest is not None:
        return f"{dest} was written ({state.digest})"
    return (
        f"{dest} was not written (its manifest goes up last; copy again to be sure, "
        "should the interrupt have come just as it went up); blobs pushed so far stay "
        "in the registry and the next copy skips them"
    )


def summary(rep: Reporter, state: CopyState) -> str:
    """``1 image (1 manifest), 4 blobs pushed, 0 skipped as present, …, 0.41s``."""
    s, p = rep.stats, state.push
    wall = time.monotonic() - s.started
    return (
        f"{s.images} image{'s' if s.images != 1 else ''} "
        f"({p.manifests} manifest{'s' if p.manifests != 1 else ''}), "
        f"{p.blobs_pushed} blobs pushed, {p.blobs_skipped} skipped as present, "
        f"{p.blobs_mounted} mounted, {human(p.bytes_pushed)} pushed "
        f"({human(s.bytes_fetched)} read from the source, {human(s.bytes_from_cache)} "
        f"from the cache), {wall:.2f}s"
    )
