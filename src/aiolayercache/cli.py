"""The ``aiolayercache`` command: pull images through the cache, and keep the cache.

Imports are lazy: ``aiolayercache --help`` loads argparse and little else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from anyio.abc import ByteReceiveStream

from ._attrs import StreamAttribute
from ._wrap import LayerWrapper

if TYPE_CHECKING:
    from . import Hash, Image, ImageIndex, Layer
    from .cache import FilesystemCache

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_SIZE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$")
_DURATION = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
# org.opencontainers.image.ref.name, as the image spec's grammar has it.
_NAME_PART = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_REF_NAME = re.compile(rf"{_NAME_PART}(?:/{_NAME_PART})*")


class UsageError(Exception):
    """Bad arguments: exit code 2."""


def parse_size(s: str) -> int:
    """``500M``, ``2GiB``, ``1.5g``, ``1024`` → bytes (K/M/G/T are powers of 1024)."""
    m = _SIZE.match(s)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (try 500M or 2G)")
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    return int(float(m.group(1)) * mult)


def parse_duration(s: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` → seconds."""
    m = _DURATION.match(s)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {s!r} (try 7d or 12h)")
    mult = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2).lower()]
    return float(m.group(1)) * mult


def parse_platform(s: str) -> str:
    """``linux/arm64``, ``linux/arm/v7``: checked here, so a bad one is a usage error."""
    from ._types import Platform

    try:
        Platform.from_string(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a platform: {s!r} (a platform is OS/ARCH[/VARIANT], "
            "e.g. linux/amd64 or linux/arm/v7)"
        ) from None
    return s


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def default_cache_dir() -> str:
    env = os.environ.get("AIOLAYERCACHE_CACHE_DIR")
    if env:
        return env
    import platformdirs

    return platformdirs.user_cache_dir("aiolayercache")


# --- argument parsing --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aiolayercache",
        description=(
            "Pull OCI and Docker images through a verified, shared layer cache "
            "(the format of crane --cache_path)."
        ),
        epilog="Run 'aiolayercache COMMAND --help' for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    pull = sub.add_parser(
        "pull",
        help="pull images into an OCI layout or a docker tarball",
        description=(
            "Pull one or more images into DEST through the layer cache. SRC is a registry "
            "reference (alpine:3.20, ghcr.io/o/r@sha256:...), oci:DIR[:REF] or "
            "docker-archive:FILE. DEST is an OCI layout directory (--format oci, the "
            "default; many images share one layout) or a docker tarball (--format tarball)."
        ),
        epilog=(
            "examples:\n"
            "  aiolayercache pull docker.io/library/alpine:3.20 alpine.tar --format tarball\n"
            "  aiolayercache pull alpine:3.20 busybox:1.36 ./images --cache-dir /var/cache/layers\n"
            "  aiolayercache pull --all-platforms alpine:3.20 ./alpine-all"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pull.add_argument("sources", metavar="SRC", nargs="+", help="images to pull")
    pull.add_argument("dest", metavar="DEST", help="OCI layout directory or tarball file")
    pull.add_argument(
        "--format",
        choices=["oci", "tarball"],
        default=None,
        help="what DEST is (default: tarball if DEST ends in .tar, else oci)",
    )
    where = pull.add_mutually_exclusive_group()
    where.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="layer cache directory (default: $AIOLAYERCACHE_CACHE_DIR or the user cache dir)",
    )
    where.add_argument("--no-cache", action="store_true", help="pull without the layer cache")
    plat = pull.add_mutually_exclusive_group()
    plat.add_argument(
        "--platform",
        type=parse_platform,
        metavar="OS/ARCH[/VARIANT]",
        help="which image of an index (default: this host); a single image of "
        "another platform is an error",
    )
    plat.add_argument(
        "--all-platforms", action="store_true", help="keep whole indexes (every platform)"
    )
    pull.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="SRC=NAME",
        help="name SRC's image NAME in DEST instead of its own name (two different "
        "images may not share a name in one DEST)",
    )
    pull.add_argument(
        "-j", "--jobs", type=int, default=4, metavar="N", help="images pulled at once (default 4)"
    )
    pull.add_argument(
        "--insecure", action="store_true", help="allow plain HTTP to non-loopback registries"
    )
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress, only the summary")
    pull.add_argument("--debug", action="store_true", help="tracebacks and debug logs")

    cache = sub.add_parser(
        "cache",
        help="inspect and maintain the layer cache",
        description="Inspect and maintain the layer cache.",
    )
    cache.add_argument("--cache-dir", metavar="DIR", help="cache directory (default as for pull)")
    cache.add_argument("--debug", action="store_true", help="tracebacks and debug logs")
    csub = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    csub.add_parser("ls", help="list entries with size and last use")
    csub.add_parser("du", help="total size and number of entries")
    csub.add_parser(
        "verify", help="hash every entry again; remove bad entries and stale temp files"
    )
    prune = csub.add_parser(
        "prune",
        help="remove least recently used entries",
        description="Remove entries, least recently used first, until the cache fits "
        "--max-size, and every entry unused for longer than --older-than.",
    )
    prune.add_argument("--max-size", type=parse_size, metavar="SIZE", help="e.g. 10G, 500M")
    prune.add_argument("--older-than", type=parse_duration, metavar="AGE", help="e.g. 30d, 12h")
    rm = csub.add_parser("rm", help="remove one entry")
    rm.add_argument("digest", metavar="DIGEST", help="sha256:<hex>")
    return p


def _version() -> str:
    from . import __version__

    return __version__


# --- sources -----------------------------------------------------------------------------


@dataclass
class Source:
    text: str
    kind: str  # registry | oci | docker-archive
    path: str = ""
    ref: str | None = None


def parse_source(s: str) -> Source:
    if s.startswith("oci:"):
        # As skopeo reads it: the directory ends at the first ':' (the ref may hold more).
        path, sep, ref_text = s[4:].partition(":")
        ref = ref_text if sep and ref_text else None
        if not path:
            raise UsageError(f"{s!r}: oci: needs a directory (oci:DIR[:REF])")
        return Source(s, "oci", path, ref)
    if s.startswith("docker-archive:"):
        path = s[len("docker-archive:") :]
        if not path:
            raise UsageError(f"{s!r}: docker-archive: needs a file")
        return Source(s, "docker-archive", path)
    text = s[len("docker://") :] if s.startswith("docker://") else s
    from .remote import InvalidReferenceError, Reference

    try:
        Reference.parse(text)
    except InvalidReferenceError as exc:
        raise UsageError(str(exc)) from None
    return Source(s, "registry", ref=text)


# --- progress ----------------------------------------------------------------------------


@dataclass
class Stats:
    images: int = 0
    layers: int = 0
    hits: int = 0
    bytes_fetched: int = 0
    bytes_from_cache: int = 0
    started: float = field(default_factory=time.monotonic)
    seen: set[str] = field(default_factory=set)


class Reporter:
    """Progress: rich bars on a terminal, log lines otherwise, nothing when quiet."""

    def __init__(self, mode: str) -> None:
        self.mode = mode  # rich | plain | quiet
        self.stats = Stats()
        self._progress: Any = None
        self._total: Any = None
        self._tasks: dict[str, Any] = {}
        if mode == "rich":
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.start()
            self._total = self._progress.add_task("total", total=0)

    def log(self, msg: str) -> None:
        if self.mode == "plain":
            print(msg, file=sys.stderr, flush=True)
        elif self.mode == "rich":
            self._progress.console.print(msg, highlight=False)

    def layer_started(self, digest: str, size: int, cached: bool) -> bool:
        """Count a layer once; returns False when it was already counted."""
        if digest in self.stats.seen:
            return False
        self.stats.seen.add(digest)
        self.stats.layers += 1
        if cached:
            self.stats.hits += 1
        if self.mode == "rich":
            t = self._progress.tasks[self._total].total or 0
            self._progress.update(self._total, total=t + size)
            label = f"{digest[7:19]} {'[green]cached[/]' if cached else 'fetching'}"
            self._tasks[digest] = self._progress.add_task(label, total=size)
        return True

    def advance(self, digest: str, n: int, cached: bool) -> None:
        if cached:
            self.stats.bytes_from_cache += n
        else:
            self.stats.bytes_fetched += n
        if self.mode == "rich":
            task = self._tasks.get(digest)
            if task is not None:
                self._progress.advance(task, n)
            self._progress.advance(self._total, n)

    def layer_done(self, digest: str, size: int, cached: bool) -> None:
        if self.mode == "rich":
            task = self._tasks.pop(digest, None)
            if task is not None:
                self._progress.remove_task(task)
        self.log(f"layer {digest[:19]} {human(size)} {'from cache' if cached else 'fetched'}")

    def image_done(self, name: str, digest: Hash) -> None:
        self.stats.images += 1
        self.log(f"pulled {name} ({digest})")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def summary(self) -> str:
        s = self.stats
        wall = time.monotonic() - s.started
        return (
            f"{s.images} image{'s' if s.images != 1 else ''}, {s.layers} layers "
            f"({s.hits} cache hits), {human(s.bytes_fetched)} fetched, "
            f"{human(s.bytes_from_cache)} from cache, {wall:.2f}s"
        )


class _CountingStream(ByteReceiveStream):
    """Passes a layer stream through, telling the reporter how many bytes went by.

    The bytes are unchanged, so it declares what its inner stream declares; a
    proven file copied by descriptor is counted through its ``consumed`` hook.
    """

    def __init__(self, inner: ByteReceiveStream, rep: Reporter, digest: str, size: int) -> None:
        self._inner = inner
        self._rep = rep
        self._digest = digest
        self._size = size
        self._cached = inner.extra(StreamAttribute.from_cache, False)
        self._seen = 0
        self._attrs: dict[Any, Callable[[], Any]] = dict(inner.extra_attributes)
        proven = inner.extra(StreamAttribute.proven_file, None)
        if proven is not None:
            counted = dataclasses.replace(proven, consumed=self._consumed)
            self._attrs[StreamAttribute.proven_file] = lambda: counted
        rep.layer_started(digest, size, self._cached)

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._attrs

    async def receive(self, max_bytes: int = 1 << 20) -> bytes:
        data = await self._inner.receive(max_bytes)
        self._seen += len(data)
        self._rep.advance(self._digest, len(data), self._cached)
        return data

    def _consumed(self, n: int) -> None:
        self._seen += n
        self._rep.advance(self._digest, n, self._cached)

    async def aclose(self) -> None:
        await self._inner.aclose()
        if self._seen >= self._size:
            self._rep.layer_done(self._digest, self._size, self._cached)


class _ObservedLayer(LayerWrapper):
    def __init__(self, inner: Layer, rep: Reporter) -> None:
        super().__init__(inner)
        self._rep = rep

    async def compressed(self) -> ByteReceiveStream:
        digest = await self._inner.digest()
        size = await self._inner.size()
        # Cached or fetched is known once the stream is open (another process may have
        # filled the entry while this one waited for it).
        inner = await self._inner.compressed()
        return _CountingStream(inner, self._rep, str(digest), size)


class _ObservedImage:
    def __init__(self, inner: Image, rep: Reporter, fs: FilesystemCache | None) -> None:
        self._inner = inner
        self._rep = rep
        self._fs = fs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def layers(self) -> list[Layer]:
        return [_ObservedLayer(x, self._rep) for x in await self._inner.layers()]

    async def layer_by_digest(self, h: Hash) -> Layer:
        return _ObservedLayer(await self._inner.layer_by_digest(h), self._rep)


class _ObservedIndex:
    def __init__(self, inner: ImageIndex, rep: Reporter, fs: FilesystemCache | None) -> None:
        self._inner = inner
        self._rep = rep
        self._fs = fs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def image(self, h: Hash) -> Image:
        return _ObservedImage(await self._inner.image(h), self._rep, self._fs)

    async def image_index(self, h: Hash) -> ImageIndex:
        return _ObservedIndex(await self._inner.image_index(h), self._rep, self._fs)


# --- pull ---------------------------------------------------------------------------------


async def _resolve(
    src: Source, args: argparse.Namespace, client: Any
) -> list[tuple[str, Image | ImageIndex, bool]]:
    """``(name, image or index, single)`` for each image of ``src``.

    ``single`` is True for an image that was not chosen from an index by its
    platform: the only kind whose platform is still to be checked.
    """
    from . import layout
    from ._types import is_index_type
    from .remote import Reference, host_platform

    platform = args.platform or str(host_platform())
    if src.kind == "registry":
        assert src.ref is not None
        ref = Reference.parse(src.ref)
        name = f"{ref.context}:{ref.tag}" if ref.tag else str(ref.identifier)
        desc = await client.get(ref)
        if desc.is_index and args.all_platforms:
            return [(name, desc.index(), False)]
        return [(name, await desc.image(platform=platform), not desc.is_index)]
    if src.kind == "oci":
        ii = await layout.index(src.path)
        im = await ii.index_manifest()
        from .layout import REF_NAME

        picks = [
            d
            for d in im.manifests
            if src.ref is None or (d.annotations or {}).get(REF_NAME) == src.ref
        ]
        if not picks:
            raise LookupError(f"{src.text}: no image named {src.ref!r} in the layout")
        out: list[tuple[str, Image | ImageIndex, bool]] = []
        for d in picks:
            name = (d.annotations or {}).get(REF_NAME) or d.digest.hex[:12]
            if is_index_type(d.media_type):
                child = await ii.image_index(d.digest)
                if args.all_platforms:
                    out.append((name, child, False))
                else:
                    out.append((name, await _platform_child(child, platform, src.text), False))
            else:
                out.append((name, await ii.image(d.digest), True))
        return out
    from . import tarball

    imgs = await tarball.images(src.path)
    return [
        ((getattr(img, "repo_tags", None) or [os.path.basename(src.path)])[0], img, True)
        for img in imgs
    ]


async def _platform_child(ii: ImageIndex, platform: str, what: str) -> Image:
    from ._types import Platform
    from .remote import PlatformNotFoundError, platform_matches

    want = Platform.from_string(platform)
    for d in (await ii.index_manifest()).manifests:
        if d.platform is not None and platform_matches(want, d.platform):
            return await ii.image(d.digest)
    raise PlatformNotFoundError(f"{what}: no image for platform {want}")


async def _check_platform(img: Image, platform: str, what: str) -> None:
    """An explicit ``--platform`` that a single image does not match is an error.

    Its config says where it runs; a config that says nothing is let through.
    """
    from ._types import Platform
    from .remote import PlatformNotFoundError, platform_matches

    cfg = await img.config_file()
    if not cfg.os or not cfg.architecture:
        return
    want = Platform.from_string(platform)
    have = Platform(
        architecture=cfg.architecture, os=cfg.os, variant=cfg.variant, os_version=cfg.os_version
    )
    if not platform_matches(want, have):
        raise PlatformNotFoundError(
            f"{what}: --platform {want} asked for, but this is a single-platform image "
            f"for {have} (not an index with a {want} image)"
        )


def _dedupe(sources: list[Source], renames: dict[str, str]) -> list[Source]:
    """The same source (and name) twice is pulled once, as crane keys images by source."""
    from .remote import Reference

    seen: set[tuple[str, ...]] = set()
    out = []
    for src in sources:
        name = renames.get(src.text, "")
        if src.kind == "registry":
            assert src.ref is not None
            key: tuple[str, ...] = (src.kind, str(Reference.parse(src.ref)), name)
        else:
            key = (src.kind, os.path.abspath(src.path), src.ref or "", name)
        if key not in seen:
            seen.add(key)
            out.append(src)
    return out


def _renames(args: argparse.Namespace) -> dict[str, str]:
    """``--name SRC=NAME`` options, checked: SRC is one of the sources, NAME a ref name."""
    out: dict[str, str] = {}
    for item in args.name:
        src, eq, name = item.rpartition("=")
        if not eq or not src or not _REF_NAME.fullmatch(name):
            raise UsageError(f"--name {item!r}: want SRC=NAME, NAME like v1 or example.com/app:1.0")
        if src not in args.sources:
            raise UsageError(f"--name {item!r}: {src!r} is not one of the sources")
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


async def _pull(args: argparse.Namespace, rep: Reporter) -> int:
    import anyio

    from . import Image, cache, layout, mutate
    from .cache import FilesystemCache
    from .remote import Client

    renames = _renames(args)
    sources = _dedupe([parse_source(s) for s in args.sources], renames)
    fmt = args.format or ("tarball" if args.dest.endswith((".tar", ".tar.gz")) else "oci")
    fs = None if args.no_cache else FilesystemCache(args.cache_dir or default_cache_dir())
    if args.jobs < 1:
        raise UsageError("-j must be at least 1")
    if fmt == "tarball" and args.all_platforms:
        raise UsageError("--all-platforms needs --format oci (a docker tarball holds images)")
    failures: list[str] = []
    # One slot per source, so DEST lists images in the order the sources were given.
    resolved: list[list[tuple[str, Any]]] = [[] for _ in sources]
    limiter = anyio.CapacityLimiter(args.jobs)
    async with Client(insecure=args.insecure) as client:

        async def resolve(i: int, src: Source) -> None:
            async with limiter:
                try:
                    for name, t, single in await _resolve(src, args, client):
                        observed: Any
                        if isinstance(t, Image):
                            img = cache.image(t, fs) if fs is not None else t
                            observed = _ObservedImage(img, rep, fs)
                            if single and args.platform:
                                await _check_platform(observed, args.platform, src.text)
                        else:
                            ii = cache.image_index(t, fs) if fs is not None else t
                            observed = _ObservedIndex(ii, rep, fs)
                        resolved[i].append((name, observed))
                except Exception as exc:
                    if args.debug:
                        raise
                    failures.append(f"{src.text}: {exc}")

        async with anyio.create_task_group() as tg:
            for i, src in enumerate(sources):
                tg.start_soon(resolve, i, src)
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
                descs = await layout.write_all(args.dest, oci, concurrency=max(4, args.jobs))
                for (name, _), d in zip(targets, descs, strict=True):
                    rep.image_done(name, d.digest)
            else:
                from . import tarball

                images = [(name, cast("Image", t)) for name, t in targets]
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
    return EXIT_OK


# --- cache --------------------------------------------------------------------------------


async def _cache(args: argparse.Namespace) -> int:
    from . import Hash, InvalidDigestError, LayerNotFoundError
    from .cache import FilesystemCache

    fs = FilesystemCache(args.cache_dir or default_cache_dir())
    action = args.cache_command
    if action == "ls":
        for e in await fs.entries():
            used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
            print(f"{e.digest}  {e.size:>12}  {used}  {e.kind}")
    elif action == "du":
        es = await fs.entries()
        total = sum(e.size for e in es)
        print(f"{total}\t{human(total)}\t{len(es)} entries\t{fs.path}")
    elif action == "verify":
        report = await fs.verify()
        for h in report.removed:
            print(f"removed {h}: its bytes do not match its name")
        print(
            f"{report.ok} entries verified, {len(report.removed)} removed, "
            f"{report.temps_removed} stale temp files removed"
        )
    elif action == "prune":
        if args.max_size is None and args.older_than is None:
            raise UsageError("prune needs --max-size and/or --older-than")
        removed = await fs.prune(max_bytes=args.max_size, older_than=args.older_than)
        for e in removed:
            print(f"removed {e.digest} ({human(e.size)})")
        print(f"{len(removed)} entries removed, {human(sum(e.size for e in removed))} freed")
    elif action == "rm":
        try:
            h = Hash.parse(args.digest)
        except InvalidDigestError as exc:
            raise UsageError(str(exc)) from None
        try:
            await fs.delete(h)
        except LayerNotFoundError as exc:
            print(f"aiolayercache: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"removed {h}")
    else:
        raise UsageError("cache needs an action: ls, du, verify, prune or rm")
    return EXIT_OK


# --- main ---------------------------------------------------------------------------------


def _dest_state(dest: str) -> str:
    """``absent``, ``layout`` (has an index.json), ``file`` or ``dir``."""
    if os.path.isfile(os.path.join(dest, "index.json")):
        return "layout"
    if os.path.isdir(dest):
        return "dir"
    return "file" if os.path.exists(dest) else "absent"


def _interrupted(dest: str, before: str) -> str:
    """What an interrupted pull left at ``dest``, in words (temp files never stay)."""
    now = _dest_state(dest)
    if now == "layout" and before == "layout":
        return f"{dest}: index.json is as it was; blobs written so far stay and are reused"
    if now == "dir" and before != "dir":
        return (
            f"{dest}: blobs of this pull but no index.json yet (not a usable layout); "
            "pull again to finish it (written blobs are reused) or remove it"
        )
    if now == before:
        return f"{dest} was not changed"
    return f"{dest} may be incomplete: pull again"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    import logging

    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="aiolayercache: %(message)s",
    )
    rep: Reporter | None = None
    before = _dest_state(args.dest) if args.command == "pull" else ""
    try:
        import anyio

        if args.command == "pull":
            quiet = args.quiet
            mode = "quiet" if quiet else ("rich" if sys.stderr.isatty() else "plain")
            rep = Reporter(mode)
            code = anyio.run(_pull, args, rep)
        else:
            code = anyio.run(_cache, args)
    except UsageError as exc:
        if rep is not None:
            rep.close()
        print(f"aiolayercache: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        what = _interrupted(args.dest, before) if args.command == "pull" else "nothing was changed"
        print(f"aiolayercache: interrupted; {what}", file=sys.stderr)
    except Exception as exc:
        if rep is not None:
            rep.close()
        if getattr(args, "debug", False):
            raise
        print(f"aiolayercache: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = EXIT_FAILED
    if rep is not None:
        rep.close()
        print(rep.summary())
    return int(code)


def run() -> None:
    sys.exit(main())
