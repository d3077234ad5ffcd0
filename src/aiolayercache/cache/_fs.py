"""``FilesystemCache``: go-containerregistry's on-disk cache format, verified and atomic.

Layout (compatible with ``crane --cache_path``)::

    <cache>/sha256:<hex>                 one file per entry (sha256-<hex> on Windows)
    <cache>/.aiolayercache/tmp/          temp files being filled
    <cache>/.aiolayercache/meta/         proofs of verification and what we know of entries

Compressed blobs are keyed by digest, uncompressed tars by diff_id. An entry
gets its final name only after its bytes hashed to that name in full; reads
of entries are hashed again as they stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import secrets
import shutil
import stat
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
from anyio.abc import ByteReceiveStream

from .. import partial
from .._atomic import AtomicFile, sweep_temps

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
from .._errors import CacheDirectoryError, LayerNotFoundError
from .._hash import Hash
from .._protocols import Layer
from .._types import MediaType
from .._wrap import LayerWrapper
from ..streams import CHUNK_SIZE, GZIP_MAGIC, ZSTD_MAGIC, FileStream, VerifyingStream

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)

__all__ = ["EntryInfo", "FilesystemCache", "VerifyReport"]

log = logging.getLogger("aiolayercache.cache")

Durability = Literal["full", "fast"]
_STATE_DIR = ".aiolayercache"
# Our state directories, parents first; each must be a real directory inside the cache.
_STATE_DIRS = (
    _STATE_DIR,
    *(os.path.join(_STATE_DIR, d) for d in ("tmp", "meta", "locks", "corrupt")),
)


def _kind_of(head: bytes) -> str:
    """``gzip``, ``zstd``, ``tar`` (ustar magic at 257) or ``blob`` (anything else: a config)."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head[257:262] == b"ustar":
        return "tar"
    return "blob"


@dataclass(frozen=True, slots=True)
class _Meta:
    """What we know of one entry, and the proof that its current file was verified."""

    size: int
    mtime_ns: int
    ino: int
    kind: str  # gzip | zstd | tar | blob
    digest: str | None = None
    diff_id: str | None = None
    media_type: str | None = None

    def proves(self, st: os.stat_result) -> bool:
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns and st.st_ino == self.ino


# Proofs seen by this process, keyed by entry path (saves reading meta files).
_PROOFS: dict[str, _Meta] = {}
# When this process last recorded a use of each entry (time.time()).
_USED: dict[str, float] = {}
_USE_GRANULARITY = 60.0
# A wait on another process's fill longer than this is logged, with what it waits for.
_NOTICE_AFTER = 5.0


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """One cache entry: its hash, size in bytes, last use (epoch seconds) and kind
    (``gzip``, ``zstd``, ``tar``, or ``unverified`` while no proof holds)."""

    digest: Hash
    size: int
    last_used: float
    kind: str


@dataclass(slots=True)
class VerifyReport:
    """What :meth:`FilesystemCache.verify` found: good entries, removed ones, stale temps."""

    ok: int = 0
    removed: list[Hash] = field(default_factory=list)
    temps_removed: int = 0


class _Flight:
    """One task filling one entry; others wait on it (in-process single-flight)."""

    def __init__(self, key: tuple[int, str]) -> None:
        self.key = key
        self.event = anyio.Event()
        self._loop = asyncio.get_running_loop()

    def release(self) -> None:
        if _FLIGHTS.get(self.key) is self:
            del _FLIGHTS[self.key]
        self.event.set()

    def release_threadsafe(self) -> None:
        if _FLIGHTS.get(self.key) is self:
            del _FLIGHTS[self.key]
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.event.set)


_FLIGHTS: dict[tuple[int, str], _Flight] = {}
# The flights whose upstream the current task is opening: a fill whose upstream reads the
# same entry through the same cache (an image wrapped twice) must not wait on itself.
_OPENING: contextvars.ContextVar[frozenset[tuple[int, str]]] = contextvars.ContextVar(
    "_OPENING", default=frozenset()
)


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)  # closing the descriptor drops its flock


def _orphaned(flight: _Flight, lock_box: list[int]) -> None:
    """Finalizer of a sink dropped without commit or abort (a stream never closed)."""
    if lock_box:
        _unlock(lock_box.pop())
    flight.release_threadsafe()


class _EntrySink:
    """Fills one cache entry through an :class:`AtomicFile` and records its proof.

    Write failures (disk full, quota, I/O errors) never fail the read: the
    sink logs one warning, counts it on the cache, drops its temp file and
    lets the verified bytes pass through uncached. Commit or abort releases
    the single-flight claim on the entry.
    """

    def __init__(
        self,
        cache: FilesystemCache,
        h: Hash,
        info: dict[str, str],
        flight: _Flight,
        lock_fd: int | None = None,
    ):
        self._cache = cache
        self._h = h
        self._info = info
        self._flight = flight
        self._lock_box = [lock_fd] if lock_fd is not None else []
        self._file = AtomicFile(
            cache._entry(h), cache._tmpdir, durable=cache.durability == "full", tag=h.hex[:16]
        )
        self._finalizer = weakref.finalize(self, _orphaned, flight, self._lock_box)

    async def open(self) -> None:
        try:
            await self._file.open()
        except OSError as exc:
            self._report(exc)

    def _report(self, exc: BaseException) -> None:
        self._cache.write_errors += 1
        log.warning("cache %s: not caching %s: %s", self._cache.path, self._h, exc)

    async def write(self, chunk: bytes) -> None:
        if not self._file.is_open:
            return
        try:
            await self._file.write(chunk)
        except OSError as exc:
            self._report(exc)
            await self._file.discard()

    async def commit(self) -> None:
        try:
            if not self._file.is_open:
                return
            try:
                await self._file.commit(after=self._record)
            except OSError as exc:
                self._report(exc)
                await self._file.discard()
        finally:
            self._release()

    def _record(self) -> None:
        st = os.stat(self._file.final)
        meta = _Meta(st.st_size, st.st_mtime_ns, st.st_ino, _kind_of(self._file.head), **self._info)
        self._cache._save_meta(self._file.final, meta)

    def _release(self) -> None:
        self._finalizer.detach()
        if self._lock_box:
            _unlock(self._lock_box.pop())
        self._flight.release()

    async def abort(self) -> None:
        try:
            await self._file.discard()
        finally:
            self._release()


class FilesystemCache:
    """A layer cache in a directory, in go-containerregistry's format.

    ``durability="full"`` (the default) fsyncs each entry before its rename
    and the directory after it; ``"fast"`` skips both. ``write_errors``
    counts entries that could not be written (their reads went on uncached).
    The directory is created, and checked, at first use.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "full",
        stalled_fill_timeout: float = 60.0,
    ) -> None:
        if durability not in ("full", "fast"):
            raise ValueError(f"durability must be 'full' or 'fast', not {durability!r}")
        self.path = Path(path)
        self.durability: Durability = durability
        # How long to wait on another process's fill of an entry that makes no progress
        # (its temp file does not grow) before fetching the entry here.
        self.stalled_fill_timeout = stalled_fill_timeout
        self.write_errors = 0
        self._root = ""
        self._tmpdir = ""
        self._metadir = ""
        self._lockdir = ""
        self._asidedir = ""
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"FilesystemCache({os.fspath(self.path)!r})"

    # --- setup and paths ---------------------------------------------------------

    async def _ensure(self) -> int:
        """Set up at first use; returns how many stale temp files that swept (else 0)."""
        if not self._tmpdir:
            return await anyio.to_thread.run_sync(self._setup)
        return 0

    async def _peek(self) -> bool:
        """For read-only use: find the cache without creating anything; False if absent."""
        if self._root:
            return True
        return await anyio.to_thread.run_sync(self._peek_sync)

    def _peek_sync(self) -> bool:
        p = self.path
        if not p.exists():
            return False
        if not p.is_dir():
            raise CacheDirectoryError(f"cache path {p} exists and is not a directory")
        root = os.path.realpath(p)
        for d in _STATE_DIRS:
            with contextlib.suppress(FileNotFoundError):
                self._check_state_dir(os.path.join(root, d))
        self._set_paths(root)
        return True

    def _check_state_dir(self, d: str) -> None:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode):
            raise CacheDirectoryError(
                f"{d} is not a directory (a symlink or a file): the cache's own state must "
                f"live inside {self.path}; refusing to use it"
            )

    def _set_paths(self, root: str) -> None:
        self._metadir = os.path.join(root, _STATE_DIR, "meta")
        self._lockdir = os.path.join(root, _STATE_DIR, "locks")
        self._asidedir = os.path.join(root, _STATE_DIR, "corrupt")
        self._root = root

    def _setup(self) -> int:
        p = self.path
        if p.exists() and not p.is_dir():
            raise CacheDirectoryError(f"cache path {p} exists and is not a directory")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheDirectoryError(
                f"cache path {p} cannot be used: {exc.strerror or exc}"
            ) from exc
        root = os.path.realpath(p)
        for d in _STATE_DIRS:
            path = os.path.join(root, d)
            try:
                os.mkdir(path)
            except FileExistsError:
                pass
            except OSError as exc:
                raise CacheDirectoryError(
                    f"cache path {p} cannot be used: {path}: {exc.strerror or exc}"
                ) from exc
            # Never through a symlink: nothing is read, written or removed outside the cache.
            self._check_state_dir(path)
        tmpdir = os.path.join(root, _STATE_DIR, "tmp")
        # Temp files of writers that died (their lock is free) go now.
        swept = len(sweep_temps(tmpdir))
        self._set_paths(root)
        self._tmpdir = tmpdir
        return swept

    def _entry(self, h: Hash) -> str:
        # A Hash is validated at construction: its file name has no separator.
        name = h.filename
        assert os.sep not in name and (os.altsep is None or os.altsep not in name)
        return os.path.join(self._root, name)

    def _meta_path(self, entry: str) -> str:
        return os.path.join(self._metadir, os.path.basename(entry) + ".json")

    # --- proofs ------------------------------------------------------------------

    def _save_meta(self, entry: str, meta: _Meta) -> None:
        _PROOFS[entry] = meta
        tmp = os.path.join(self._tmpdir, f"meta.{secrets.token_hex(6)}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(asdict(meta), f)
            os.replace(tmp, self._meta_path(entry))
        except OSError as exc:
            log.debug("cache %s: cannot save proof for %s: %s", self.path, entry, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def _load_meta(self, entry: str) -> _Meta | None:
        m = _PROOFS.get(entry)
        if m is not None:
            return m
        try:
            with open(self._meta_path(entry)) as f:
                return _Meta(**json.load(f))
        except (OSError, ValueError, TypeError):
            return None

    def _forget(self, entry: str) -> None:
        _PROOFS.pop(entry, None)
        try:
            os.unlink(self._meta_path(entry))
        except OSError:
            pass

    def _forget_proof(self, entry: str) -> None:
        """Void the proof of ``entry`` but keep what we know of it (digest, diff_id)."""
        _PROOFS.pop(entry, None)
        m = self._load_meta(entry)
        if m is not None:
            self._save_meta(entry, replace(m, ino=-1))

    def _lookup_sync(self, h: Hash) -> _Meta | None:
        """The proven meta of entry ``h``; hash an unproven file first; None if absent or bad.

        Only a regular file is an entry: anything else there (a directory, a FIFO, a
        symlink) is set aside, and an entry that cannot be read is a miss (one warning).
        """
        entry = self._entry(h)
        try:
            st = os.lstat(entry)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            self._set_aside(entry, st)
            return None
        m = self._load_meta(entry)
        if m is not None and m.proves(st):
            _PROOFS[entry] = m
            return m
        return self._verify_sync(h, entry, m)

    def _unusable(self, entry: str, exc: OSError) -> None:
        """An entry we cannot read is a miss: say so once, and forget its proof."""
        self._forget_proof(entry)
        if entry not in self._warned:
            self._warned.add(entry)
            log.warning(
                "cache %s: cannot read entry %s (%s); fetching it again",
                self.path,
                os.path.basename(entry),
                exc.strerror or exc,
            )

    def _set_aside(self, entry: str, st: os.stat_result) -> None:
        """Move something that is not a regular file out of an entry's name."""
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        name = os.path.basename(entry)
        self._forget(entry)
        aside = os.path.join(self._asidedir, f"{name}.{secrets.token_hex(4)}")
        try:
            os.rename(entry, aside)
        except FileNotFoundError:
            return
        except OSError as exc:
            why = exc.strerror or exc
            log.warning("cache %s: entry %s is %s; cannot move it: %s", self.path, name, kind, why)
            return
        log.warning(
            "cache %s: entry %s was %s; moved to %s (`cache verify` removes it)",
            self.path,
            name,
            kind,
            aside,
        )

    def _verify_sync(self, h: Hash, entry: str, old: _Meta | None) -> _Meta | None:
        hasher = h.hasher()
        head = b""
        try:
            fd = os.open(entry, os.O_RDONLY | _NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._unusable(entry, exc)
            return None
        try:
            with open(fd, "rb", buffering=0) as f:
                before = os.fstat(f.fileno())
                if not stat.S_ISREG(before.st_mode):
                    return None  # replaced by something else since the lstat
                while chunk := f.read(CHUNK_SIZE):
                    if not head:
                        head = chunk[:512]
                    hasher.update(chunk)
                after = os.fstat(f.fileno())
        except OSError as exc:
            self._unusable(entry, exc)
            return None
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            return None  # being written by someone else right now: not proven
        if hasher.hexdigest() != h.hex:
            self._remove_if_same(entry, after)
            log.warning("cache %s: removed entry %s: its bytes do not match", self.path, h)
            return None
        kind = _kind_of(head)
        info: dict[str, Any] = {}
        if old is not None:
            info = {"digest": old.digest, "diff_id": old.diff_id, "media_type": old.media_type}
        if kind == "tar":
            info["diff_id"] = str(h)
        else:
            info["digest"] = str(h)  # a compressed layer, or a blob served as it is
        meta = _Meta(after.st_size, after.st_mtime_ns, after.st_ino, kind, **info)
        self._save_meta(entry, meta)
        return meta

    def _remove_if_same(self, entry: str, seen: os.stat_result) -> None:
        try:
            now = os.stat(entry)
        except FileNotFoundError:
            return
        if (now.st_ino, now.st_size, now.st_mtime_ns) == (
            seen.st_ino,
            seen.st_size,
            seen.st_mtime_ns,
        ):
            try:
                os.unlink(entry)
            except FileNotFoundError:
                pass
            self._forget(entry)

    async def _lookup(self, h: Hash) -> _Meta | None:
        entry = self._entry(h)
        # Fast paths, one stat and no thread hop: a miss, or an entry proven in this process.
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            _PROOFS.pop(entry, None)
            return None
        m = _PROOFS.get(entry)
        if m is not None and m.proves(st):
            self._note_use(entry)
            return m
        result: _Meta | None = await anyio.to_thread.run_sync(self._lookup_sync, h)
        if result is not None:
            self._note_use(entry)
        return result

    def _note_use(self, entry: str) -> None:
        """Record last use as the proof file's mtime, at most once a minute per entry."""
        now = time.time()
        if now - _USED.get(entry, 0.0) < _USE_GRANULARITY:
            return
        _USED[entry] = now
        with contextlib.suppress(OSError):
            os.utime(self._meta_path(entry))

    # --- upkeep ------------------------------------------------------------------

    async def entries(self) -> list[EntryInfo]:
        """Every committed entry with its size, kind and last use (newest first).

        Reads only: a cache directory that does not exist is empty, and is not made.
        """
        if not await self._peek():
            return []
        return await anyio.to_thread.run_sync(self._entries_sync)

    def _scan(self) -> list[tuple[Hash, str, os.stat_result]]:
        """Every name in the cache that is an entry's name, with its ``lstat``."""
        out: list[tuple[Hash, str, os.stat_result]] = []
        for name in os.listdir(self._root):
            alg, sep, hex_ = name.partition("-" if os.name == "nt" else ":")
            try:
                h = Hash(alg, hex_) if sep else None
            except ValueError:
                h = None
            if h is None:
                continue
            entry = os.path.join(self._root, name)
            try:
                out.append((h, entry, os.lstat(entry)))
            except FileNotFoundError:
                continue
        return out

    def _entries_sync(self) -> list[EntryInfo]:
        out: list[EntryInfo] = []
        for h, entry, st in self._scan():
            if not stat.S_ISREG(st.st_mode):
                continue  # not an entry; `verify` moves it away
            m = self._load_meta(entry)
            try:
                used = os.stat(self._meta_path(entry)).st_mtime
            except OSError:
                used = st.st_mtime
            if not os.access(entry, os.R_OK):
                kind = "unreadable"
            elif m is not None and m.proves(st):
                kind = m.kind
            else:
                kind = "unverified"
            out.append(EntryInfo(h, st.st_size, max(used, st.st_mtime), kind))
        out.sort(key=lambda e: e.last_used, reverse=True)
        return out

    async def verify(self) -> VerifyReport:
        """Hash every entry again (proofs ignored); remove bad ones and stale temp files.

        Removed too: entries that cannot be read, and whatever sits at an entry's
        name without being a regular file (a directory, a FIFO, a symlink).
        """
        swept = await self._ensure()  # a first use sweeps: count those too
        report = await anyio.to_thread.run_sync(self._verify_all_sync)
        report.temps_removed += swept
        return report

    def _verify_all_sync(self) -> VerifyReport:
        report = VerifyReport()
        for h, entry, st in self._scan():
            if not stat.S_ISREG(st.st_mode):
                self._set_aside(entry, st)
                report.removed.append(h)
                continue
            _PROOFS.pop(entry, None)
            with contextlib.suppress(OSError):
                os.unlink(self._meta_path(entry))
            if self._verify_sync(h, entry, None) is not None:
                report.ok += 1
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry)  # unreadable: of no use to anyone here
            self._forget(entry)
            report.removed.append(h)
        self._empty_aside()
        report.temps_removed = len(sweep_temps(self._tmpdir))
        return report

    def _empty_aside(self) -> None:
        """Remove what was set aside (never following a symlink out of the cache)."""
        for name in os.listdir(self._asidedir):
            path = os.path.join(self._asidedir, name)
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except OSError as exc:
                log.warning("cache %s: cannot remove %s: %s", self.path, path, exc)

    async def sweep(self) -> int:
        """Remove temp files left by writers that died (lock-based); return how many."""
        swept = await self._ensure()  # a first use sweeps: count those too
        return swept + len(await anyio.to_thread.run_sync(sweep_temps, self._tmpdir))

    async def prune(
        self, *, max_bytes: int | None = None, older_than: float | None = None
    ) -> list[EntryInfo]:
        """Remove least recently used entries until at most ``max_bytes`` remain, and
        every entry unused for ``older_than`` seconds. Returns what was removed.

        Readers in other processes that hold an entry open finish reading it
        (POSIX keeps an unlinked file's bytes for open descriptors).
        """
        if not await self._peek():
            return []
        entries = await self.entries()
        now = time.time()
        removed: list[EntryInfo] = []
        keep = sorted(entries, key=lambda e: e.last_used, reverse=True)
        total = sum(e.size for e in keep)
        for e in reversed(keep):  # least recently used first
            too_old = older_than is not None and now - e.last_used > older_than
            too_big = max_bytes is not None and total > max_bytes
            if not (too_old or too_big):
                continue
            try:
                await self.delete(e.digest)
            except LayerNotFoundError:
                continue
            total -= e.size
            removed.append(e)
        return removed

    # --- reading and filling -----------------------------------------------------

    async def _open_entry(self, h: Hash, meta: _Meta) -> ByteReceiveStream:
        """A verified stream of entry ``h``; FileNotFoundError if it is gone, another
        OSError if it cannot be read (then it is a miss: see :meth:`_unusable`)."""
        entry = self._entry(h)
        fs = await FileStream.open(entry, regular=True)
        try:
            st = os.fstat(fs.fileno())
        except BaseException:
            await fs.aclose()
            raise

        async def on_mismatch() -> None:
            log.warning("cache %s: entry %s changed after it was verified; removed", self.path, h)
            await anyio.to_thread.run_sync(self._remove_if_same, entry, st)

        # While the proof holds, a consumer that copies whole files may copy this one by
        # descriptor (StreamAttribute.proven_file); it hashes what lands all the same.
        return VerifyingStream(
            fs,
            h,
            meta.size,
            what=f"cache entry {entry}",
            on_mismatch=on_mismatch,
            proven_fd=fs.fileno() if meta.proves(st) else None,
            from_cache=True,
        )

    async def _fill(
        self,
        h: Hash,
        open_upstream: Callable[[], Awaitable[ByteReceiveStream]],
        size: int | None,
        info: dict[str, str],
    ) -> ByteReceiveStream:
        """A stream of ``h``: from the entry if present, else upstream teed into it.

        One filler per entry: tasks of this process wait on an in-process
        flight; other processes wait on the entry's lock file (``flock``),
        then read what the filler committed, or take over if it failed (or
        made no progress for ``stalled_fill_timeout`` seconds).
        """
        await self._ensure()
        entry = self._entry(h)
        key = (id(asyncio.get_running_loop()), entry)
        while True:
            flight = _FLIGHTS.get(key)
            if flight is not None:
                if key in _OPENING.get():
                    # We are inside this entry's own fill: pass through; the outer fill caches.
                    return await open_upstream()
                await flight.event.wait()
                continue
            stream = await self._open_committed(h)
            if stream is not None:
                return stream
            # Checked and claimed in one step of the event loop.
            if key in _FLIGHTS:
                continue
            flight = _Flight(key)
            _FLIGHTS[key] = flight
            lock_fd: int | None = None
            try:
                lock_fd = await self._lock_entry(h)
                # Another process may have committed the entry while we waited for its lock.
                stream = await self._open_committed(h)
            except BaseException:
                if lock_fd is not None:
                    _unlock(lock_fd)
                flight.release()
                raise
            if stream is None:
                break
            if lock_fd is not None:
                _unlock(lock_fd)
            flight.release()
            return stream
        opening = _OPENING.set(_OPENING.get() | {key})
        try:
            upstream = await open_upstream()
        except BaseException:
            if lock_fd is not None:
                _unlock(lock_fd)
            flight.release()
            raise
        finally:
            _OPENING.reset(opening)
        sink = _EntrySink(self, h, info, flight, lock_fd)
        try:
            await sink.open()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await sink.abort()
                await upstream.aclose()
            raise
        return VerifyingStream(upstream, h, size, what=str(h), sinks=[sink], from_cache=False)

    async def _open_committed(self, h: Hash) -> ByteReceiveStream | None:
        """A stream of the committed entry ``h``, or None when there is no usable one."""
        meta = await self._lookup(h)
        if meta is None:
            return None
        try:
            return await self._open_entry(h, meta)
        except FileNotFoundError:
            return None
        except OSError as exc:  # unreadable, or no longer a regular file
            self._unusable(self._entry(h), exc)
            return None

    def _try_lock(self, h: Hash) -> int | None:
        path = os.path.join(self._lockdir, f"{h.algorithm}-{h.hex}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        if fcntl is None:  # pragma: no cover - Windows: in-process single-flight only
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    async def _lock_entry(self, h: Hash) -> int | None:
        """Take entry ``h``'s lock file, waiting while another process holds it.

        Polls with a growing pause (10 ms to 250 ms), so waiting stays
        cancellable. A wait of more than a few seconds is logged with what it
        waits for; when the other process's temp file has not grown for
        ``stalled_fill_timeout`` seconds, the wait ends without the lock (None):
        the entry is then fetched here too (the rename keeps either copy whole).
        """
        delay = 0.01
        started = last_check = last_growth = time.monotonic()
        told = 0.0
        seen = -1
        while True:
            fd = self._try_lock(h)
            if fd is not None:
                return fd
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.25)
            now = time.monotonic()
            if now - last_check < 1.0:
                continue
            last_check = now
            size = await anyio.to_thread.run_sync(self._filling_size, h)
            if size != seen:
                seen, last_growth = size, now
            if now - last_growth >= self.stalled_fill_timeout:
                log.warning(
                    "cache %s: another process filling %s made no progress for %.0f s; "
                    "fetching it here",
                    self.path,
                    h,
                    now - last_growth,
                )
                return None
            if now - started >= _NOTICE_AFTER and now - told >= 30.0:
                told = now
                log.warning(
                    "cache %s: waiting for another process to finish filling %s (%d bytes so far)",
                    self.path,
                    h,
                    max(seen, 0),
                )

    def _filling_size(self, h: Hash) -> int:
        """Bytes in the temp files filling ``h`` (named after it), as a sign of progress."""
        prefix = f".{h.hex[:16]}."
        total = 0
        try:
            with os.scandir(self._tmpdir) as it:
                for e in it:
                    if e.name.startswith(prefix):
                        with contextlib.suppress(OSError):
                            total += e.stat(follow_symlinks=False).st_size
        except OSError:
            pass
        return total

    # --- the Cache protocol ------------------------------------------------------

    async def put(self, layer: Layer) -> Layer:
        """A layer whose streams fill this cache as they are read (lazily)."""
        await self._ensure()
        return _TeeLayer(self, layer)

    async def get(self, h: Hash) -> Layer:
        """The cached layer stored under ``h`` (a digest or a diff_id)."""
        await self._ensure()
        meta = await self._lookup(h)
        if meta is None:
            raise LayerNotFoundError(f"{h} is not in cache {self.path}")
        return _cached_layer(self, h, meta)

    async def delete(self, h: Hash) -> None:
        """Remove the entry ``h``; :class:`LayerNotFoundError` if there is none.

        Whatever sits at the entry's name goes, also if it is not a regular file.
        """
        if not await self._peek():
            raise LayerNotFoundError(f"{h} is not in cache {self.path}")
        entry = self._entry(h)

        def remove() -> None:
            try:
                st = os.lstat(entry)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(entry)  # does not follow symlinks inside
                else:
                    os.unlink(entry)
            except FileNotFoundError:
                raise LayerNotFoundError(f"{h} is not in cache {self.path}") from None
            finally:
                self._forget(entry)

        await anyio.to_thread.run_sync(remove)


class _TeeLayer(LayerWrapper):
    """What ``FilesystemCache.put`` returns: streams served from, or filling, the cache."""

    def __init__(self, cache: FilesystemCache, inner: Layer) -> None:
        super().__init__(inner)
        self._cache = cache

    def __repr__(self) -> str:
        return f"<cached {self._inner!r} in {self._cache!r}>"

    async def compressed(self) -> ByteReceiveStream:
        h = await self._inner.digest()
        size = await self._inner.size()
        info = {"digest": str(h), "media_type": str(await self._inner.media_type())}
        return await self._cache._fill(h, self._inner.compressed, size, info)

    async def uncompressed(self) -> ByteReceiveStream:
        h = await self._inner.diff_id()
        info = {"diff_id": str(h), "media_type": str(await self._inner.media_type())}
        return await self._cache._fill(h, self._inner.uncompressed, None, info)


class _EntryOpener:
    def __init__(self, cache: FilesystemCache, h: Hash) -> None:
        self._cache = cache
        self._h = h

    async def __call__(self) -> ByteReceiveStream:
        stream = await self._cache._open_committed(self._h)
        if stream is not None:
            return stream
        raise LayerNotFoundError(f"{self._h} is no longer in cache {self._cache.path}")


class _CachedCompressed(partial._CompressedLayer):
    """A layer served from a compressed (gzip / zstd) entry, keyed by digest."""

    def __init__(self, cache: FilesystemCache, h: Hash, meta: _Meta) -> None:
        mt = meta.media_type or (
            MediaType.OCI_LAYER_ZSTD if meta.kind == "zstd" else MediaType.DOCKER_LAYER
        )
        diff_id = Hash.parse(meta.diff_id) if meta.diff_id else None
        super().__init__(_EntryOpener(cache, h), h, meta.size, mt, diff_id)
        self.stored_size = meta.size
        self._cache = cache
        self._meta = meta

    async def diff_id(self) -> Hash:
        had = self._diff_id is not None
        out = await super().diff_id()
        if not had:
            entry = self._cache._entry(self._digest)
            m = replace(self._meta, diff_id=str(out))
            await anyio.to_thread.run_sync(self._cache._save_meta, entry, m)
        return out


class _CachedUncompressed(partial._UncompressedLayer):
    """A layer served from an uncompressed tar entry, keyed by diff_id; gzip'd on the fly."""

    def __init__(self, cache: FilesystemCache, h: Hash, meta: _Meta) -> None:
        mt = meta.media_type or MediaType.DOCKER_LAYER
        super().__init__(_EntryOpener(cache, h), h, mt, 1)
        self.stored_size = meta.size


def _cached_layer(cache: FilesystemCache, h: Hash, meta: _Meta) -> Layer:
    if meta.kind == "tar" and meta.digest != str(h):
        return _CachedUncompressed(cache, h, meta)
    return _CachedCompressed(cache, h, meta)
