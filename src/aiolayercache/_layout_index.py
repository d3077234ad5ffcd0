"""A layout's own files: its skeleton (``oci-layout``, the blob directories, swept temps)
and ``index.json``, replaced atomically under a lock on the layout directory."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import anyio
import anyio.to_thread

from ._atomic import AtomicFile, sweep_temps
from ._layout_base import REF_NAME, LayoutError, inside, read_index_json
from ._types import Descriptor, IndexManifest, MediaType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["lock_layout", "prepare", "update_index"]

log = logging.getLogger("aiolayercache.layout")

_LAYOUT_FILE = b'{"imageLayoutVersion":"1.0.0"}'
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def prepare(root: str) -> bytes | None:
    """Create the layout's skeleton; return the current index.json, if any."""
    p = Path(root)
    if p.exists() and not p.is_dir():
        raise LayoutError(f"{root} exists and is not a directory")
    # Blobs go where the reader will look: never through a symlink out of the layout.
    inside(root, str(p / "blobs"))
    inside(root, str(p / "blobs" / "sha256"))
    (p / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    # Temp files of writers that were killed (their lock is free) go now; only names
    # our writers give are touched, and only in the directories they write to.
    swept = sweep_temps(root, ours_only=True)
    for alg in ("sha256", "sha512"):
        d = p / "blobs" / alg
        if d.is_dir() and not d.is_symlink():
            swept += sweep_temps(inside(root, str(d)), ours_only=True)
    if swept:
        log.info("layout %s: removed %d temp files of an interrupted write", root, len(swept))
    layout_file = p / "oci-layout"
    if not layout_file.exists():
        # A name of our own (writers may run at once), created new: never written through
        # a leftover or a planted symlink.
        for attempt in range(5):
            tmp = p / f".oci-layout.{secrets.token_hex(8)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
            with open(fd, "wb") as f:
                f.write(_LAYOUT_FILE)
            try:
                os.replace(tmp, layout_file)
                break
            except FileNotFoundError:  # another writer's sweep took it (unlocked): again
                if attempt == 4:
                    raise
    if (p / "index.json").exists():
        return read_index_json(root)
    return None


async def lock_layout(root: str) -> int:
    """An exclusive ``flock`` on the layout directory itself (no file is added to it)."""
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    if fcntl is None:  # pragma: no cover - Windows: no lock
        return fd
    delay = 0.005
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                await anyio.sleep(delay)  # another writer is replacing index.json: briefly
                delay = min(delay * 2, 0.1)
    except BaseException:
        os.close(fd)
        raise


async def update_index(root: str, named: list[Descriptor], durable: bool) -> None:
    """index.json with ``named`` added (replacing entries of the same ref name), atomically."""
    current = await anyio.to_thread.run_sync(current_index_json, root)
    manifests: list[Descriptor] = []
    if current is not None:
        manifests = list(IndexManifest.parse(current).manifests)
    for desc in named:
        name = (desc.annotations or {}).get(REF_NAME)

        def same(d: Descriptor, name: str | None = name, desc: Descriptor = desc) -> bool:
            if name is not None:
                return (d.annotations or {}).get(REF_NAME) == name
            return d.annotations is None and d.digest == desc.digest

        at = [i for i, d in enumerate(manifests) if same(d)]
        if at:  # replaced where it was (a pull again leaves index.json as it is)
            manifests[at[0]] = desc
            manifests = [d for i, d in enumerate(manifests) if i not in at[1:]]
        else:
            manifests.append(desc)
    doc = IndexManifest(schema_version=2, manifests=manifests, media_type=MediaType.OCI_IMAGE_INDEX)
    raw = doc.to_json()
    if raw == current:
        return  # nothing new: no rewrite, no fsync
    out = AtomicFile(os.path.join(root, "index.json"), root, durable=durable, tag="index")
    await out.open()
    try:
        await out.write(raw)
        await out.commit()
    except BaseException:
        await out.discard()
        raise


def current_index_json(root: str) -> bytes | None:
    if os.path.lexists(os.path.join(root, "index.json")):
        return read_index_json(root)
    return None
