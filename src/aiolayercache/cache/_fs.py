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

__all__ = ["EntryInfo", "FilesystemCache", "VerifyReport"]

log = logging.getLogger("aiolayercache.cache")

Durability = Literal["full", "fast"]
_STATE_DIR = ".aiolayercache"


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

    def __init__(self, path: str | os.PathLike[str], *, durability: Durability = "full") -> None:
        if durability not in ("full", "fast"):
            raise ValueError(f"durability must be 'full' or 'fast', not {durability!r}")
        self.path = Path(path)
        self.durability: Durability = durability
        self.write_errors = 0
        self._root = ""
        self._tmpdir = ""
        self._metadir = ""
        self._lockdir = ""

    def __repr__(self) -> str:
        return f"FilesystemCache({os.fspath(self.path)!r})"

    # --- setup and paths ---------------------------------------------------------

    async def _ensure(self) -> int:
        """Set up at first use; returns how many stale temp files that swept (else 0)."""
        if not self._root:
            return await anyio.to_thread.run_sync(self._setup)
        return 0

    def _setup(self) -> int:
        p = self.path
        if p.exists() and not p.is_dir():
            raise CacheDirectoryError(f"cache path {p} exists and is not a directory")
        try:
            (p / _STATE_DIR / "tmp").mkdir(parents=True, exist_ok=True)
            (p / _STATE_DIR / "meta").mkdir(exist_ok=True)
        except OSError as exc:
            raise CacheDirectoryError(
                f"cache path {p} cannot be used: {exc.strerror or exc}"
            ) from exc
        root = os.path.realpath(p)
        # Temp files of writers that died (their lock is free) go now.
        swept = len(sweep_temps(os.path.join(root, _STATE_DIR, "tmp")))
        self._tmpdir = os.path.join(root, _STATE_DIR, "tmp")
        self._lockdir = os.path.join(root, _STATE_DIR, "locks")
        try:
            os.makedirs(self._lockdir, exist_ok=True)
        except OSError as exc:
            raise CacheDirectoryError(f"cache path {p} cannot be used: {exc}") from exc
        self._metadir = os.path.join(root, _STATE_DIR, "meta")
        self._root = root
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

    def _lookup_sync(self, h: Hash) -> _Meta | None:
        """The proven meta of entry ``h``; hash an unproven file first; None if absent or bad."""
        entry = self._entry(h)
        try:
            st = os.stat(entry)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        m = self._load_meta(entry)
        if m is not None and m.proves(st):
            _PROOFS[entry] = m
            return m
        return self._verify_sync(h, entry, m)

    def _verify_sync(self, h: Hash, entry: str, old: _Meta | None) -> _Meta | None:
        hasher = h.hasher()
        head = b""
        try:
            with open(entry, "rb", buffering=0) as f:
                before = os.fstat(f.fileno())
                while chunk := f.read(CHUNK_SIZE):
                    if not head:
                        head = chunk[:512]
                    hasher.update(chunk)
                after = os.fstat(f.fileno())
        except FileNotFoundError:
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
            st = os.stat(entry)
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
        """Every committed entry with its size, kind and last use (newest first)."""
        await self._ensure()
        return await anyio.to_thread.run_sync(self._entries_sync)

    def _entries_sync(self) -> list[EntryInfo]:
        out: list[EntryInfo] = []
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
                st = os.stat(entry)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            m = self._load_meta(entry)
            try:
                used = os.stat(self._meta_path(entry)).st_mtime
            except OSError:
                used = st.st_mtime
            kind = m.kind if m is not None and m.proves(st) else "unverified"
            out.append(EntryInfo(h, st.st_size, max(used, st.st_mtime), kind))
        out.sort(key=lambda e: e.last_used, reverse=True)
        return out

    async def verify(self) -> VerifyReport:
        """Hash every entry again (proofs ignored); remove bad ones and stale temp files."""
        swept = await self._ensure()  # a first use sweeps: count those too
        report = await anyio.to_thread.run_sync(self._verify_all_sync)
        report.temps_removed += swept
        return report

    def _verify_all_sync(self) -> VerifyReport:
        report = VerifyReport()
        for e in self._entries_sync():
            entry = self._entry(e.digest)
            _PROOFS.pop(entry, None)
            with contextlib.suppress(OSError):
                os.unlink(self._meta_path(entry))
            if self._verify_sync(e.digest, entry, None) is None:
                report.removed.append(e.digest)
            else:
                report.ok += 1
        report.temps_removed = len(sweep_temps(self._tmpdir))
        return report

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
        await self._ensure()
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
        """A verified stream of entry ``h``; FileNotFoundError if it is gone."""
        entry = self._entry(h)
        fs = await FileStream.open(entry)
        try:
            st = os.fstat(fs._file.fileno())
        except BaseException:
            await fs.aclose()
            raise

        async def on_mismatch() -> None:
            log.warning("cache %s: entry %s changed after it was verified; removed", self.path, h)
            await anyio.to_thread.run_sync(self._remove_if_same, entry, st)

        stream = VerifyingStream(
            fs, h, meta.size, what=f"cache entry {entry}", on_mismatch=on_mismatch
        )
        if meta.proves(st):
            # Consumers that copy whole files may trust the proof and let the kernel copy.
            stream.proven_fd = fs.fileno()
        return stream

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
        then read what the filler committed, or take over if it failed.
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
            meta = await self._lookup(h)
            if meta is not None:
                try:
                    return await self._open_entry(h, meta)
                except FileNotFoundError:
                    continue
            # Sync on purpose: checked and claimed in one step of the event loop.
            if key in _FLIGHTS or os.path.exists(entry):  # noqa: ASYNC240
                continue
            flight = _Flight(key)
            _FLIGHTS[key] = flight
            try:
                lock_fd = await self._lock_entry(h)
            except BaseException:
                flight.release()
                raise
            if lock_fd is None:
                # Another process committed the entry while we waited for its lock.
                flight.release()
                continue
            break
        opening = _OPENING.set(_OPENING.get() | {key})
        try:
            upstream = await open_upstream()
        except BaseException:
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
        return VerifyingStream(upstream, h, size, what=str(h), sinks=[sink])

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

        Returns the locked descriptor, or None when the entry appeared while
        waiting (the other process committed it). Polls with a growing pause
        (10 ms to 250 ms), so waiting stays cancellable.
        """
        entry = self._entry(h)
        delay = 0.01
        while True:
            fd = self._try_lock(h)
            if fd is not None:
                if os.path.exists(entry):  # noqa: ASYNC240 - committed before we got the lock
                    _unlock(fd)
                    return None
                return fd
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.25)
            if os.path.exists(entry):  # noqa: ASYNC240
                return None

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
        """Remove the entry ``h``; :class:`LayerNotFoundError` if there is none."""
        await self._ensure()
        entry = self._entry(h)

        def remove() -> None:
            try:
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
        meta = await self._cache._lookup(self._h)
        if meta is not None:
            try:
                return await self._cache._open_entry(self._h, meta)
            except FileNotFoundError:
                pass
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
