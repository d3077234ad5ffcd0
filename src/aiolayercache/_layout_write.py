"""Writing OCI layouts: blobs in parallel, each atomically and verified; index.json last.

Concurrent writers into one layout are safe: blobs go in by rename, and
``index.json`` is read, merged and replaced under an ``flock`` of the layout
directory, so neither loses the other's images.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import stat
from collections.abc import Sequence
from typing import Literal

import anyio
import anyio.to_thread
from anyio.abc import ByteReceiveStream

from . import mutate, partial
from ._atomic import AtomicFile, fsync_dir
from ._attrs import LINK_WANTED, FilledEntry
from ._errors import CacheReadError, DigestMismatchError, first_error
from ._hash import Hash
from ._layout_base import REF_NAME, LayoutError, blob_path
from ._layout_index import lock_layout, prepare, update_index
from ._protocols import Image, ImageIndex
from ._types import Descriptor, is_index_type
from .streams import BytesStream, StreamAttribute, VerifyingStream

__all__ = ["write", "write_all"]

log = logging.getLogger("aiolayercache.layout")
_CHUNK = 1024 * 1024
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


# The proof that a blob was verified in full, kept on the blob itself (an extended
# attribute, so the layout holds no extra files): its digest, size, mtime and inode.
# Any change of the file voids it, as for cache entries. Where the filesystem has no
# user xattrs, existing blobs are simply hashed again.
_PROOF_ATTR = "user.aiolayercache.proof"


def _proof_value(h: Hash, st: os.stat_result) -> bytes:
    return f"{h} {st.st_size} {st.st_mtime_ns} {st.st_ino}".encode()


def _record_proof(path: str, h: Hash) -> None:
    setxattr = getattr(os, "setxattr", None)
    if setxattr is None:
        return
    with contextlib.suppress(OSError):
        setxattr(path, _PROOF_ATTR, _proof_value(h, os.stat(path)), follow_symlinks=False)


def _proof_holds(path: str, h: Hash, st: os.stat_result) -> bool:
    getxattr = getattr(os, "getxattr", None)
    if getxattr is None:
        return False
    try:
        value: bytes = getxattr(path, _PROOF_ATTR, follow_symlinks=False)
    except OSError:
        return False
    return value == _proof_value(h, st)


_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}

# Blobs being written, by (event loop, path): concurrent writers of one layout in this
# process (many pulls into one DEST) write each shared blob once; the others wait.
_WRITING: dict[tuple[int, str], anyio.Event] = {}


class _Writer:
    def __init__(self, root: str, durable: bool, concurrency: int, link: bool = True) -> None:
        self.root = root
        self.durable = durable
        self.link = link
        self.limiter = anyio.CapacityLimiter(concurrency)
        self.claimed: set[Hash] = set()
        self.dirs: set[str] = set()
        self.written = 0
        self.reused = 0
        self.waited = False

    def _verified(self, h: Hash, size: int) -> bool:
        """Is a good copy of ``h`` there already? A bad one stays until the new copy
        replaces it by rename (the layout may be the source being read, too)."""
        path = blob_path(self.root, h)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            raise LayoutError(f"{path}: a directory where blob {h} belongs")
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False  # a symlink, a FIFO or a short file: never read, replaced
        if _proof_holds(path, h, st):
            return True
        hasher = h.hasher()
        with open(os.open(path, os.O_RDONLY | _NOFOLLOW), "rb", buffering=0) as f:
            while chunk := f.read(_CHUNK):
                hasher.update(chunk)
        if hasher.hexdigest() == h.hex:
            _record_proof(path, h)
            return True
        return False

    async def blob(self, desc: Descriptor, open_: partial.Opener) -> None:
        h = desc.digest
        if h in self.claimed:
            return
        self.claimed.add(h)
        key = (id(asyncio.get_running_loop()), blob_path(self.root, h))
        while (other := _WRITING.get(key)) is not None:
            self.waited = True  # (its name must be on disk before our index.json, too)
            await other.wait()  # another writer of this layout has it: then it is reused
        done = _WRITING[key] = anyio.Event()
        try:
            await self._blob(desc, open_)
        except OSError as exc:
            if exc.filename is not None or exc.errno not in _NO_ROOM:
                raise
            # A full disk, a quota, a read-only filesystem, a file too big: say which file.
            raise LayoutError(f"{key[1]}: cannot write blob {h}: {exc.strerror or exc}") from exc
        finally:
            del _WRITING[key]
            done.set()

    async def _blob(self, desc: Descriptor, open_: partial.Opener) -> None:
        h = desc.digest
        async with self.limiter:
            out = self._temp(h)
            # One worker-thread job: is the blob there already, else create its temp file.
            if await anyio.to_thread.run_sync(self._verified_or_open, h, desc.size, out):
                self.reused += 1
                return
            try:
                await self._put(desc, open_, out)
            except (DigestMismatchError, CacheReadError) as exc:
                # A source that was proven once and rotted since (a cache entry) has
                # condemned itself, or a cache stopped serving it: open it again, which
                # fetches the bytes anew (elsewhere).
                log.warning("layout %s: %s; reading %s once more", self.root, exc, h)
                out = self._temp(h)
                await anyio.to_thread.run_sync(out.open_sync)
                await self._put(desc, open_, out)
            self.written += 1

    def _temp(self, h: Hash) -> AtomicFile:
        blob_dir = os.path.dirname(blob_path(self.root, h))
        self.dirs.add(blob_dir)
        return AtomicFile(
            blob_path(self.root, h),
            blob_dir,
            durable=self.durable,
            tag=h.hex[:16],
            sync_dir=False,  # one fsync of the directory before index.json, for all
        )

    def _verified_or_open(self, h: Hash, size: int, out: AtomicFile) -> bool:
        if self._verified(h, size):
            return True
        out.open_sync()
        return False

    async def _put(self, desc: Descriptor, open_: partial.Opener, out: AtomicFile) -> None:
        """Write one blob into ``out`` (its temp file made): verified in full, then
        renamed; a proof last, in the same worker-thread job as the rename."""
        h = desc.digest
        out.attach()
        try:
            wanted = LINK_WANTED.set(self.link)
            try:
                raw = await open_()
            finally:
                LINK_WANTED.reset(wanted)
            filled = raw.extra(StreamAttribute.filled_entry, None) if self.link else None
            if filled is not None and await self._link(desc, raw, filled, out):
                return
            if filled is not None:  # not linked: read it again, not through the cache
                raw = await filled.reopen()
            proven = raw.extra(StreamAttribute.proven_file, None)
            if proven is not None and proven.digest == h and proven.size == desc.size:
                # A proven cache entry: linked (or else copied by the kernel), and what is
                # there is hashed before the rename, so a file that rotted since its proof
                # never passes.
                proof = functools.partial(_record_proof, out.final, h)
                async with raw:
                    landed = None
                    if self.link:
                        landed = await out.link_proven(proven.fd, desc.size, h, after=proof)
                    linked = landed is not None
                    if not linked:
                        landed = await out.copy_from(proven.fd, desc.size, h)
                    if landed != h:
                        await proven.condemn()
                        raise DigestMismatchError(f"cache copy of blob {h}", h, landed)
                    proven.consumed(desc.size)
                if linked:
                    return
            else:
                stream = VerifyingStream(raw, h, desc.size, what=f"blob {h}")
                async with stream:
                    async for chunk in stream:
                        await out.write(chunk)
                        del chunk  # (not held while the next is read: the memory budget)
            # Only bytes hashed on their way in earn a proof.
            await out.commit(after=functools.partial(_record_proof, out.final, h))
        except BaseException:
            await out.discard()
            raise

    async def _link(
        self, desc: Descriptor, raw: ByteReceiveStream, filled: FilledEntry, out: AtomicFile
    ) -> bool:
        """Read ``raw`` through (the cache's tee hashes it into its entry), then link the
        committed entry as the blob: one write and one fsync of the bytes, not two."""
        h = desc.digest
        stream = VerifyingStream(raw, h, desc.size, what=f"blob {h}")  # (trusts the tee)
        async with stream:
            async for _ in stream:
                pass
            fd = filled.take()  # (ended cleanly: the entry is committed, or was not kept)
        if fd is None:
            return False
        proof = functools.partial(_record_proof, out.final, h)
        try:
            # Only bytes hashed on their way in earn a proof (the tee hashed these).
            if await out.commit_link(fd, fsync=self.durable and not filled.durable, after=proof):
                return True
            # No link here (another filesystem, not permitted): copy that same file, not
            # the upstream again, hashing what lands.
            landed = await out.copy_from(fd, desc.size, h)
            if landed != h:
                raise DigestMismatchError(f"cache copy of blob {h}", h, landed)
            await out.commit(after=proof)
            return True
        finally:
            os.close(fd)

    async def data(self, desc: Descriptor, raw: bytes) -> None:
        actual = Hash.of(raw, desc.digest.algorithm)
        if actual != desc.digest or len(raw) != desc.size:
            raise DigestMismatchError(f"manifest {desc.digest}", desc.digest, actual)

        async def open_() -> ByteReceiveStream:
            return BytesStream(raw)

        await self.blob(desc, open_)

    async def image(self, tg: anyio.abc.TaskGroup, img: Image) -> Descriptor:
        raw = await img.raw_manifest()
        m = await img.manifest()
        desc = Descriptor(
            media_type=await img.media_type(), size=len(raw), digest=await img.digest()
        )
        raw_config = await img.raw_config_file()
        tg.start_soon(self.data, m.config, raw_config)
        layers = await img.layers()
        for d, layer in zip(m.layers, layers, strict=True):
            tg.start_soon(self.blob, d, layer.compressed)
        tg.start_soon(self.data, desc, raw)
        return desc

    async def index(
        self, tg: anyio.abc.TaskGroup, ii: ImageIndex, depth: int = 0, seen: set[Hash] | None = None
    ) -> Descriptor:
        raw = await ii.raw_manifest()
        desc = Descriptor(media_type=await ii.media_type(), size=len(raw), digest=await ii.digest())
        seen = set() if seen is None else seen
        for child in (await ii.index_manifest()).manifests:
            if child.digest in seen:
                continue  # the same bytes however often the tree lists them: written once
            seen.add(child.digest)
            if is_index_type(child.media_type):
                nested = partial._nested_depth(depth, desc.digest, child.digest)
                await self.index(tg, await ii.image_index(child.digest), nested, seen)
            else:
                await self.image(tg, await ii.image(child.digest))
        tg.start_soon(self.data, desc, raw)
        return desc


async def write(
    path: str | os.PathLike[str],
    target: Image | ImageIndex,
    *,
    ref_name: str | None = None,
    concurrency: int = 8,
    durability: Literal["full", "fast"] = "full",
    oci: bool = False,
    link: bool = True,
) -> Descriptor:
    """Write ``target`` (an image, or an index tree) into the layout at ``path``.

    The layout is created if needed, or added to: blobs already there are
    kept when they verify, and ``index.json`` gets a descriptor for
    ``target`` (annotated with ``ref_name`` when given, replacing any entry
    with that name). Blobs are written ``concurrency`` at a time, each
    atomically; ``index.json`` is replaced last. Returns the new descriptor.

    With ``oci=True`` Docker manifests and manifest lists are written with OCI
    media types (:func:`aiolayercache.mutate.to_oci`), as ``skopeo copy`` does
    into a layout: skopeo and umoci find only OCI-typed images in one. Layers
    and configs are unchanged; a converted manifest has a new digest, which
    the returned descriptor carries. By default manifests are kept as they are.

    A layer read through a :class:`~aiolayercache.cache.FilesystemCache` on
    the layout's filesystem becomes a hard link to the cache entry it filled
    (the bytes are written and fsync'd once, not twice); ``link=False``
    writes a copy. Elsewhere, and when a link is refused, blobs are copies.
    """
    (desc,) = await write_all(
        path,
        [(target, ref_name)],
        concurrency=concurrency,
        durability=durability,
        oci=oci,
        link=link,
    )
    return desc


async def write_all(
    path: str | os.PathLike[str],
    targets: Sequence[tuple[Image | ImageIndex, str | None]],
    *,
    concurrency: int = 8,
    durability: Literal["full", "fast"] = "full",
    oci: bool = False,
    link: bool = True,
) -> list[Descriptor]:
    """Write several images or indexes into one layout, with one ``index.json`` update.

    ``targets`` pairs each image or index with its ref name (or None). All
    blobs of all targets are written in parallel (shared ones once), then
    ``index.json`` is replaced once, last. ``oci=True`` converts each target
    to OCI media types first, as :func:`write` does; ``link`` as there.
    """
    if oci:
        targets = [(await mutate.to_oci(t), name) for t, name in targets]
    root = await anyio.to_thread.run_sync(os.path.realpath, path)
    try:
        # An index.json that cannot be read fails the write now, before any blob moves.
        await anyio.to_thread.run_sync(prepare, root)
    except OSError as exc:
        raise LayoutError(f"{root}: cannot prepare the layout: {exc.strerror}") from exc
    w = _Writer(root, durability == "full", concurrency, link)
    descs: list[Descriptor] = []
    try:
        async with anyio.create_task_group() as tg:
            for target, _ in targets:
                if isinstance(target, ImageIndex) and not isinstance(target, Image):
                    descs.append(await w.index(tg, target))
                else:
                    descs.append(await w.image(tg, target))
    except BaseExceptionGroup as eg:
        # Callers catch DigestMismatchError, not a group: raise the first real error.
        raise first_error(eg) from None
    named: list[Descriptor] = []
    for desc, (_, ref_name) in zip(descs, targets, strict=True):
        if ref_name is not None:
            desc = Descriptor(
                media_type=desc.media_type,
                size=desc.size,
                digest=desc.digest,
                annotations={REF_NAME: ref_name},
            )
        named.append(desc)
    if w.durable and (w.written or w.waited):
        # The blobs' names are on disk before index.json can point at them.
        for d in sorted(w.dirs):
            await anyio.to_thread.run_sync(fsync_dir, d)
    # Read, merge and replace index.json under the layout's lock: two writers into one
    # layout at once (two pulls) each add their images; neither loses the other's.
    lock = await lock_layout(root)
    try:
        await update_index(root, named, durability == "full")
    finally:
        os.close(lock)  # drops the flock
    return named
