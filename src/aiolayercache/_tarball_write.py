"""Writing ``docker save`` archives (the writing half of :mod:`aiolayercache.tarball`).

Every blob streams from its image into one temp file next to the destination
(no whole-image buffering), verified as it goes; the file is renamed into
place at the end. Kept apart from the reader so each module stays small.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tarfile
from collections.abc import Mapping, Sequence
from typing import Literal

import anyio
import anyio.to_thread

from ._atomic import AtomicFile, sweep_temps
from ._errors import AioLayerCacheError, CacheReadError, DigestMismatchError
from ._hash import Hash
from ._protocols import Image, Layer
from ._types import Descriptor
from .streams import VerifyingStream, sniff

__all__ = ["TarballError", "write"]

log = logging.getLogger("aiolayercache.tarball")


class TarballError(AioLayerCacheError):
    """A tarball is malformed, names a member it lacks, or names one unsafely."""

    __module__ = "aiolayercache.tarball"


def kind(head: bytes) -> str:
    """``"gzip"``, ``"zstd"`` or ``"tar"``: what a layer starting with ``head`` holds."""
    k = sniff(head)
    return k if k in ("gzip", "zstd") else "tar"


async def _member(out: AtomicFile, desc: Descriptor, layer: Layer, written: set[str]) -> str:
    """Write one layer into the archive (once: ``written`` names what is in); its name."""
    stream = VerifyingStream(
        await layer.compressed(), desc.digest, desc.size, what=f"layer {desc.digest}"
    )
    async with stream:
        first = b""
        try:
            first = await stream.receive()
        except anyio.EndOfStream:
            pass
        name = f"{desc.digest.hex}{_EXT[kind(first)]}"
        if name in written:
            return name
        await out.write(_header(name, desc.size))
        if first:
            await out.write(first)
        async for chunk in stream:
            await out.write(chunk)
            del chunk  # (not held while the next is read: the memory budget)
        await out.write(_padding(desc.size))
        written.add(name)
    return name


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


_EXT = {"gzip": ".tar.gz", "zstd": ".tar.zst", "tar": ".tar"}


async def write(
    path: str | os.PathLike[str],
    target: Image | Mapping[str, Image] | Sequence[tuple[str, Image]],
    *,
    durability: Literal["full", "fast"] = "full",
) -> None:
    """Write images as a ``docker save`` archive at ``path`` (replaced atomically).

    ``target`` is an image (no tag) or tagged images (``{"repo:tag": img}``).
    Blobs stream from each image into the archive; shared layers go in once.
    """
    if isinstance(target, Mapping):
        tagged: list[tuple[str | None, Image]] = list(target.items())
    elif isinstance(target, Sequence):
        tagged = list(target)
    else:
        tagged = [(None, target)]
    final = await anyio.to_thread.run_sync(os.path.realpath, os.fspath(path))
    if await anyio.to_thread.run_sync(os.path.isdir, final):
        raise TarballError(f"{final} is a directory: a docker tarball is written as a file")
    # Temp files of a killed earlier write (lock free, our names only) go now.
    await anyio.to_thread.run_sync(
        functools.partial(sweep_temps, os.path.dirname(final), ours_only=True)
    )
    out = AtomicFile(final, os.path.dirname(final), durable=durability == "full", tag="tarball")
    try:
        await out.open()
    except OSError as exc:  # it names the temp file, which the caller never asked for
        raise OSError(exc.errno, exc.strerror, final) from exc
    try:
        written: set[str] = set()
        entries: list[dict[str, object]] = []
        by_image: dict[Hash, dict[str, object]] = {}
        for tag, img in tagged:
            digest = await img.digest()
            if digest in by_image:
                if tag:
                    by_image[digest]["RepoTags"].append(tag)  # type: ignore[attr-defined]
                continue
            m = await img.manifest()
            raw_config = await img.raw_config_file()
            config_name = f"{m.config.digest.hex}.json"
            if config_name not in written:
                await out.write(_header(config_name, len(raw_config)))
                await out.write(raw_config)
                await out.write(_padding(len(raw_config)))
                written.add(config_name)
            names = []
            for desc, layer in zip(m.layers, await img.layers(), strict=True):
                start = out.size
                try:
                    name = await _member(out, desc, layer, written)
                except (DigestMismatchError, CacheReadError) as exc:
                    # A source proven once that rotted since (a cache entry) condemned
                    # itself: drop what went in of it and read it once more (fetched anew).
                    log.warning("tarball %s: %s; reading layer %s once more", final, exc, desc)
                    await out.rewind(start)
                    name = await _member(out, desc, layer, written)
                names.append(name)
            entry: dict[str, object] = {
                "Config": config_name,
                "RepoTags": [tag] if tag else [],
                "Layers": names,
            }
            by_image[digest] = entry
            entries.append(entry)
        manifest = json.dumps(entries, separators=(",", ":")).encode()
        await out.write(_header("manifest.json", len(manifest)))
        await out.write(manifest)
        await out.write(_padding(len(manifest)))
        await out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        await out.commit()
    except BaseException:
        await out.discard()
        raise
