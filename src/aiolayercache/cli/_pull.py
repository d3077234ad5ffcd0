"""``aiolayercache pull``: sources through the cache into a layout or a tarball."""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, cast

import anyio

from .. import Hash, Image, cache, layout, mutate
from ..cache import Counted
from ..remote import Client, InvalidReferenceError, Reference
from ._args import EXIT_FAILED, EXIT_OK, UsageError
from ._caches import layer_cache
from ._progress import ObservedImage, ObservedIndex, Reporter
from ._sources import Source, check_platform, dedupe, failure, parse_source, resolve

__all__ = ["DestState", "dest_state", "interrupted", "pull"]

# org.opencontainers.image.ref.name, as the image spec's grammar has it.
_NAME_PART = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_REF_NAME = re.compile(rf"{_NAME_PART}(?:/{_NAME_PART})*")


def _tarball_name(name: str) -> str | None:
    """``REPOSITORY[:TAG]`` as ``docker load`` takes a RepoTag, or None.

    The repository is what :meth:`Reference.parse` accepts (lowercase); no
    digest. A name without a tag gets ``:latest``, as ``docker tag`` gives it:
    ``docker load`` refuses a RepoTag without one.
    """
    try:
        ref = Reference.parse(name)
    except InvalidReferenceError:
        return None
    if ref.digest is not None or "@" in name:
        return None
    return name if name.endswith(f":{ref.tag}") else f"{name}:{ref.tag}"


def _renames(args: argparse.Namespace, fmt: str) -> dict[str, str]:
    """``--name SRC=NAME`` options, checked: SRC is one of the sources, named once;
    NAME is a ref name (a layout) or a repository and tag (a docker tarball)."""
    out: dict[str, str] = {}
    for item in args.name:
        src, eq, name = item.rpartition("=")
        if not eq or not src:
            raise UsageError(f"--name {item!r}: want SRC=NAME")
        if src not in args.sources:
            raise UsageError(f"--name {item!r}: {src!r} is not one of the sources")
        if fmt == "tarball":
            tag = _tarball_name(name)
            if tag is None:
                raise UsageError(
                    f"--name {item!r}: {name!r} is not a name docker load takes: a tarball "
                    "names an image REPOSITORY[:TAG], the repository lowercase, no digest "
                    "(e.g. example.com/app:1.0)"
                )
            name = tag
        elif not _REF_NAME.fullmatch(name):
            raise UsageError(
                f"--name {item!r}: {name!r} is not a ref name of an OCI layout "
                "(e.g. v1 or example.com/app:1.0)"
            )
        if out.get(src, name) != name:
            raise UsageError(
                f"--name: {src!r} is named twice, {out[src]!r} and {name!r}; give it one name"
            )
        out[src] = name
    return out


async def _name_apart(
    sources: list[Source],
    resolved: list[list[tuple[str, Any]]],
    renames: dict[str, str],
    fmt: str,
    dest: str,
) -> list[tuple[str, Any]]:
    """What goes into DEST, by name: one name, one image.

    A second image under a taken name would replace the first (index.json, or
    RepoTags for docker load) and lose it: a usage error naming both sources.
    The same image under the same name twice goes in once. An image is what
    DEST tells apart: the manifest digest in a layout, the config digest (the
    image ID) in a docker tarball.
    """
    targets: list[tuple[str, Any]] = []
    owners: dict[str, tuple[Source, Hash]] = {}
    for src, items in zip(sources, resolved, strict=True):
        if src.text in renames:
            if len(items) != 1:
                raise UsageError(
                    f"--name {src.text}=...: {src.text} holds {len(items)} images; "
                    "--name names one (pick it with oci:DIR:REF)"
                )
            items = [(renames[src.text], items[0][1])]
        for name, t in items:
            digest = await t.digest() if fmt == "oci" else (await t.manifest()).config.digest
            owner = owners.get(name)
            if owner is None:
                owners[name] = (src, digest)
                targets.append((name, t))
            elif owner[1] != digest:
                first = owner[0].text
                if first != src.text:
                    who = f"{first} and {src.text}"
                    fix = f"name one apart with --name '{src.text}=OTHER-NAME', or pull"
                else:
                    who, fix = f"two images of {src.text}", "pull"
                raise UsageError(
                    f"{who} are both named {name!r} in {dest}, but are different "
                    f"images ({owner[1]}, {digest}); {fix} them into separate destinations"
                )
    return targets


async def pull(args: argparse.Namespace, rep: Reporter) -> int:
    fmt = args.format or ("tarball" if args.dest.endswith((".tar", ".tar.gz")) else "oci")
    renames = _renames(args, fmt)
    sources = dedupe([parse_source(s) for s in args.sources], renames)
    if args.jobs < 1:
        raise UsageError("-j must be at least 1")
    if fmt == "tarball" and args.all_platforms:
        raise UsageError("--all-platforms needs --format oci (a docker tarball holds images)")
    failures: list[str] = []
    # One slot per source, so DEST lists images in the order the sources were given.
    resolved: list[list[tuple[str, Any]]] = [[] for _ in sources]
    limiter = anyio.CapacityLimiter(args.jobs)
    async with Client(
        insecure=args.insecure, registries_conf=args.registries_conf, cert_dir=args.cert_dir
    ) as client:
        fs, fleet = layer_cache(args, client, local=not args.no_cache)
        rep.fleet = fleet is not None
        try:

            async def resolve_into(i: int, src: Source) -> None:
                async with limiter:
                    try:
                        for name, t, single in await resolve(src, args, client):
                            observed: Any
                            if isinstance(t, Image):
                                img = cache.image(t, fs) if fs is not None else t
                                observed = ObservedImage(img, rep)
                                if single and args.platform:
                                    await check_platform(observed, args.platform)
                            else:
                                ii = cache.image_index(t, fs) if fs is not None else t
                                observed = ObservedIndex(ii, rep)
                            resolved[i].append((name, observed))
                    except Exception as exc:
                        if args.debug:
                            raise
                        failures.append(failure(src, exc))

            async with anyio.create_task_group() as tg:
                for i, src in enumerate(sources):
                    tg.start_soon(resolve_into, i, src)
            if failures:
                for f in failures:
                    print(f"aiolayercache: pull failed: {f}", file=sys.stderr)
                return EXIT_FAILED
            try:
                if fmt == "oci":
                    # OCI media types, as skopeo writes them: its layout reader finds no others.
                    resolved = [[(n, await mutate.to_oci(t)) for n, t in ts] for ts in resolved]
                targets = await _name_apart(sources, resolved, renames, fmt, args.dest)
                if fmt == "oci":
                    oci = [(t, name) for name, t in targets]
                    descs = await layout.write_all(args.dest, oci, concurrency=4 * args.jobs)
                    for (name, _), d in zip(targets, descs, strict=True):
                        rep.image_done(name, d.digest)
                else:
                    images = [(name, cast("Image", t)) for name, t in targets]
                    from .. import tarball  # only a tarball DEST needs the format

                    await tarball.write(args.dest, images)
                    for name, t in targets:
                        rep.image_done(name, await t.digest())
            except UsageError:
                raise
            except Exception as exc:
                if args.debug:
                    raise
                names = ", ".join(s.text for s in sources)
                print(f"aiolayercache: pull of {names} failed: {exc}", file=sys.stderr)
                return EXIT_FAILED
        finally:
            if fleet is not None:
                await fleet.flush()  # the uploads that finish behind the reads
            if isinstance(fs, Counted):
                rep.evicted = fs.stats().evictions
    return EXIT_OK


@dataclass(frozen=True)
class DestState:
    """What DEST was before a pull: enough to say truly what an interrupt left.

    ``kind`` is ``absent``, ``layout`` (has an index.json), ``dir`` (a
    directory without one) or ``file``. ``stamp`` is the index.json's (a
    layout) or the file's inode, size and mtime: both are replaced atomically,
    so an unchanged stamp means unchanged bytes. ``names`` (a ``dir`` only) are
    the names a pull writes: the top level and ``blobs/ALG/*``.
    """

    kind: str
    stamp: tuple[int, int, int] | None = None
    names: frozenset[str] = frozenset()


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _listing(path: str) -> frozenset[str]:
    """Names only, where a layout write puts them: cheap, and enough, as blobs never change."""
    names: set[str] = set()
    try:
        names.update(os.listdir(path))
        blobs = os.path.join(path, "blobs")
        if os.path.isdir(blobs) and not os.path.islink(blobs):
            for alg in os.listdir(blobs):
                names.add(f"blobs/{alg}")
                d = os.path.join(blobs, alg)
                if os.path.isdir(d) and not os.path.islink(d):
                    names.update(f"blobs/{alg}/{n}" for n in os.listdir(d))
    except OSError:
        pass
    return frozenset(names)


def dest_state(dest: str) -> DestState:
    index = os.path.join(dest, "index.json")
    if os.path.isfile(index):
        return DestState("layout", stamp=_stamp(index))
    if os.path.isdir(dest):
        return DestState("dir", names=_listing(dest))
    if os.path.exists(dest):
        return DestState("file", stamp=_stamp(dest))
    return DestState("absent")


def interrupted(dest: str, before: DestState) -> str:
    """What an interrupted pull left at ``dest``, in words (temp files never stay)."""
    now = dest_state(dest)
    again = "pull again to be sure it holds every image"
    if now.kind == "layout":
        if before.kind != "layout":  # index.json comes last: the pull got there
            return f"{dest}: index.json was written as the interrupt came; {again}"
        if now.stamp == before.stamp:
            return f"{dest}: index.json is as it was; blobs written so far stay and are reused"
        return f"{dest}: index.json was replaced as the interrupt came; {again}"
    if now.kind == "dir":
        if before.kind == "dir" and now.names == before.names:
            return f"{dest} was not changed"
        if before.kind == "layout":  # index.json is replaced, never removed, by a pull
            return f"{dest}: index.json is gone; pull again"
        # Remove it only if this pull made it: a directory that was there may hold other files.
        fix = " or remove it" if before.kind == "absent" else ""
        return (
            f"{dest}: blobs of an unfinished pull but no index.json yet (not a usable "
            f"layout); pull again to finish it (written blobs are reused){fix}"
        )
    if now.kind == "absent":
        return f"{dest} was not written" if before.kind == "absent" else f"{dest} is gone"
    if before.kind == "file" and now.stamp == before.stamp:
        return f"{dest} was not changed"
    if before.kind == "absent":  # a tarball is renamed into place when complete
        return f"{dest} was written as the interrupt came; {again}"
    return f"{dest} was replaced as the interrupt came; {again}"
