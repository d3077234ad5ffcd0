"""``FilesystemCache``: go-containerregistry's on-disk cache format, verified and atomic.

Layout (compatible with ``crane --cache_path``)::

    <cache>/sha256:<hex>                 one file per entry (sha256-<hex> on Windows)
    <cache>/.aiolayercache/tmp/          temp files being filled
    <cache>/.aiolayercache/meta/         proofs of verification and what we know of entries
    <cache>/.aiolayercache/locks/        one lock file per entry being filled (flock)
    <cache>/.aiolayercache/corrupt/      what was found at an entry's name and set aside

Compressed blobs are keyed by digest, uncompressed tars by diff_id. An entry
gets its final name only after its bytes hashed to that name in full; reads
of entries are hashed again as they stream. The rooms: proofs in
``_proofs``, single-flight in ``_flight``, the filling sink in ``_sink``,
upkeep in ``_upkeep``, the layers handed out in ``_layers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
from aiofiles.threadpool.binary import AsyncFileIO
from anyio.abc import ByteReceiveStream

from .._atomic import sweep_temps
from .._attrs import LINK_WANTED, FilledEntry
from .._errors import CacheDirectoryError, LayerNotFoundError
from .._hash import Hash
from .._protocols import Layer
from ..streams import FileStream, StreamAttribute, VerifyingStream
from . import _upkeep
from ._base import CacheStats
from ._bound import Budget
from ._flight import FLIGHTS, OPENING, EntryLocks, Flight
from ._layers import TeeLayer, cached_layer
from ._proofs import Meta, ProofStore
from ._sink import EntrySink, claim
from ._upkeep import EntryInfo, VerifyReport

__all__ = ["EntryInfo", "FilesystemCache", "VerifyReport"]

log = logging.getLogger("aiolayercache.cache")

Durability = Literal["full", "fast"]
_STATE_DIR = ".aiolayercache"
# Our state directories, parents first; each must be a real directory inside the cache.
_STATE_DIRS = (
    _STATE_DIR,
    *(os.path.join(_STATE_DIR, d) for d in ("tmp", "meta", "locks", "corrupt")),
)


class FilesystemCache:
    """A layer cache in a directory, in go-containerregistry's format.

    ``durability="full"`` (the default) fsyncs each entry before its rename
    and the directory after it; ``"fast"`` skips both. ``write_errors``
    counts entries that could not be written (their reads went on uncached).
    ``stalled_fill_timeout`` is how long a process waits on another
    process's fill of an entry that makes no progress (its temp file does
    not grow) before fetching the entry itself. The directory is created,
    and checked, at first use; listing and pruning create nothing.
    """

    label = "local"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "full",
        stalled_fill_timeout: float = 60.0,
        max_bytes: int | None = None,
    ) -> None:
        if durability not in ("full", "fast"):
            raise ValueError(f"durability must be 'full' or 'fast', not {durability!r}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._stats = CacheStats()
        self._budget: Budget | None = None
        self._waiting: dict[Hash, int] = {}  # tasks waiting on an entry's fill, to open it
        self.durability: Durability = durability
        self.stalled_fill_timeout = stalled_fill_timeout
        self.write_errors = 0
        self._store: ProofStore | None = None
        self._locks: EntryLocks | None = None
        self._warned_locks = False

    def __repr__(self) -> str:
        return f"FilesystemCache({os.fspath(self.path)!r})"

    # --- setup ---------------------------------------------------------------------

    async def _ready(self) -> ProofStore:
        """The store, set up for filling (created at first use)."""
        if self._locks is None or self._store is None:
            await anyio.to_thread.run_sync(self._setup)
        assert self._store is not None
        return self._store

    async def _peek(self) -> ProofStore | None:
        """For read-only use: the store without creating anything; None if there is no cache."""
        if self._store is None:
            await anyio.to_thread.run_sync(self._peek_sync)
        return self._store

    def _check_state_dir(self, d: str) -> None:
        if not stat.S_ISDIR(os.lstat(d).st_mode):
            raise CacheDirectoryError(
                f"{d} is not a directory (a symlink or a file): the cache's own state must "
                f"live inside {self.path}; refusing to use it"
            )

    def _store_at(self, root: str, tmpdir: str) -> ProofStore:
        state = os.path.join(root, _STATE_DIR)
        return ProofStore(
            self.path,
            root,
            os.path.join(state, "meta"),
            tmpdir,
            os.path.join(state, "corrupt"),
        )

    def _peek_sync(self) -> None:
        p = self.path
        if not p.exists():
            return
        if not p.is_dir():
            raise CacheDirectoryError(f"cache path {p} exists and is not a directory")
        root = os.path.realpath(p)
        for d in _STATE_DIRS:
            with contextlib.suppress(FileNotFoundError):
                self._check_state_dir(os.path.join(root, d))
        self._store = self._store_at(root, "")

    def _setup(self) -> int:
        """Create and check the directories; sweep dead temps. Returns how many were swept."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise CacheDirectoryError(f"cache path {p} exists and is not a directory")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheDirectoryError(f"cache path {p} cannot be used: {exc.strerror}") from exc
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
        swept = len(sweep_temps(tmpdir))  # temp files of writers that died (lock free)
        self._store = self._store_at(root, tmpdir)
        self._locks = EntryLocks(self.path, os.path.join(root, _STATE_DIR, "locks"), tmpdir)
        if self.max_bytes is not None and self._budget is None:
            self._budget = Budget(
                self._store,
                os.path.join(root, _STATE_DIR),
                self.max_bytes,
                pinned=lambda h: self._waiting.get(h, 0) > 0,
            )
            with self._budget.lock:
                self._budget.refresh()
        return swept

    # --- upkeep --------------------------------------------------------------------

    async def entries(self) -> list[EntryInfo]:
        """Every committed entry with its size, kind and last use (newest first).

        Reads only: a cache directory that does not exist is empty, and is not made.
        """
        store = await self._peek()
        if store is None:
            return []
        return await anyio.to_thread.run_sync(_upkeep.entries, store)

    async def verify(self) -> VerifyReport:
        """Hash every entry again (proofs ignored); remove bad ones and stale temp files.

        Removed too: entries that cannot be read, and whatever sits at an entry's
        name without being a regular file (a directory, a FIFO, a symlink).
        """
        if await self._peek() is None:
            return VerifyReport()  # no cache there: nothing to verify, and nothing is made
        swept = await self.sweep()  # a first use sweeps: count those too
        report = await anyio.to_thread.run_sync(_upkeep.verify_all, await self._ready())
        report.temps_removed += swept
        return report

    async def sweep(self) -> int:
        """Remove temp files left by writers that died (lock-based); return how many."""
        swept = 0 if self._locks is not None else await anyio.to_thread.run_sync(self._setup)
        store = await self._ready()
        return swept + len(await anyio.to_thread.run_sync(sweep_temps, store.tmpdir))

    async def prune(
        self, *, max_bytes: int | None = None, older_than: float | None = None
    ) -> list[EntryInfo]:
        """Remove least recently used entries until at most ``max_bytes`` remain, and
        every entry unused for ``older_than`` seconds. Returns what was removed.

        Readers in other processes that hold an entry open finish reading it
        (POSIX keeps an unlinked file's bytes for open descriptors).
        """
        removed: list[EntryInfo] = []
        for e in _upkeep.to_prune(await self.entries(), max_bytes, older_than):
            try:
                await self.delete(e.digest)
            except LayerNotFoundError:
                continue
            removed.append(e)
        return removed

    # --- reading and filling (the Entries protocol of the layers) -------------------

    async def _lookup(self, h: Hash) -> Meta | None:
        store = await self._ready()
        # Fast paths, one lstat and no thread hop: a miss, or an entry proven in this process.
        decided, meta = store.proven_now(h)
        if not decided:
            meta = await anyio.to_thread.run_sync(store.lookup, h)
        if meta is not None:
            self._used(store, h)
        return meta

    def _used(self, store: ProofStore, h: Hash) -> None:
        store.note_use(store.entry(h))
        if self._budget is not None:
            self._budget.used(h)

    def _stream(self, store: ProofStore, h: Hash, meta: Meta, file: Any) -> ByteReceiveStream:
        """A verified stream of entry ``h`` over its open ``file``."""
        entry = store.entry(h)
        fs = FileStream(AsyncFileIO(file, asyncio.get_running_loop(), None), entry)
        st = os.fstat(fs.fileno())

        async def on_mismatch() -> None:
            log.warning("cache %s: entry %s changed after it was verified; removed", self.path, h)
            await anyio.to_thread.run_sync(store.remove_if_same, entry, st)

        self._stats.bytes_served += meta.size
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

    async def open_committed(self, h: Hash) -> ByteReceiveStream | None:
        """A verified stream of the committed entry ``h``; None when there is no usable one.

        One worker-thread job at most: the lookup (unless this process proved the
        entry already) and the open."""
        store = await self._ready()
        decided, meta = store.proven_now(h)
        if decided and meta is None:
            return None  # a miss, seen with one lstat
        try:
            got = await anyio.to_thread.run_sync(store.open_entry, h, meta)
        except FileNotFoundError:
            return None
        except OSError as exc:  # unreadable, or no longer a regular file
            await anyio.to_thread.run_sync(store.unusable, store.entry(h), exc)
            return None
        if got is None:
            return None
        self._used(store, h)
        return self._stream(store, h, *got)

    async def remember(self, h: Hash, meta: Meta) -> None:
        store = await self._ready()
        await anyio.to_thread.run_sync(store.save, store.entry(h), meta)

    def _no_locks(self, exc: OSError) -> None:
        """Fill without the cross-process lock (in-process single-flight still holds)."""
        if not self._warned_locks:
            self._warned_locks = True
            log.warning(
                "cache %s: cannot take entry locks (%s); other processes may fetch the same "
                "layers at the same time",
                self.path,
                exc.strerror or exc,
            )

    def _write_error(self, h: Hash, exc: BaseException) -> None:
        self.write_errors += 1
        log.warning("cache %s: not caching %s: %s", self.path, h, exc)

    def _committed(self, h: Hash, size: int) -> None:
        """(A worker thread, right after an entry's rename.) Count it; keep the bound."""
        self._stats.bytes_written += size
        if self._budget is not None:
            try:
                self._budget.committed(h, size)
            except OSError as exc:  # the bound is kept next time; the entry stays
                log.warning("cache %s: cannot keep the bound now: %s", self.path, exc)

    def stats(self) -> CacheStats:
        """What this cache object did since it was made (see :class:`CacheStats`)."""
        s = self._stats
        evictions = self._budget.evictions if self._budget is not None else 0
        return CacheStats(
            s.hits, s.misses, s.bytes_served, s.bytes_written, evictions, self.write_errors
        )

    async def fill(
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
        store = await self._ready()
        assert self._locks is not None
        key = (id(asyncio.get_running_loop()), store.entry(h))
        durable = self.durability == "full"
        link = LINK_WANTED.get()
        while True:
            flight = FLIGHTS.get(key)
            if flight is not None:
                if key in OPENING.get():
                    # We are inside this entry's own fill: pass through; the outer fill caches.
                    return await open_upstream()
                self._waiting[h] = self._waiting.get(h, 0) + 1
                try:
                    await flight.event.wait()
                    stream = await self.open_committed(h)  # (pinned against eviction till now)
                finally:
                    self._waiting[h] -= 1
                    if not self._waiting[h]:
                        del self._waiting[h]
                        if self._budget is not None:  # what the pin kept may go now
                            with anyio.CancelScope(shield=True):
                                await anyio.to_thread.run_sync(self._budget.trim)
                if stream is not None:
                    return stream
                continue
            stream = await self.open_committed(h)
            if stream is not None:
                return stream
            if key in FLIGHTS:  # checked and claimed in one step of the event loop
                continue
            flight = Flight(key)
            FLIGHTS[key] = flight
            sink = EntrySink(
                store,
                h,
                info,
                flight,
                None,
                durable=durable,
                on_error=self._write_error,
                on_commit=self._committed,
                keep_open=link,
            )
            try:
                # One worker-thread job: lock, look again, create the temp file.
                claimed = await anyio.to_thread.run_sync(
                    claim, self._locks, store, sink, self._no_locks
                )
                stream = None
                if claimed is None:  # another process fills it: wait for its lock
                    try:
                        lock_fd = await self._locks.lock(h, self.stalled_fill_timeout)
                    except OSError as exc:  # the locks directory cannot be used
                        self._no_locks(exc)
                    else:
                        if lock_fd is not None:  # (None: it stalled; fetch here too)
                            sink.hold(lock_fd)
                    # It may have committed the entry while we waited for its lock.
                    stream = await self.open_committed(h)
                    if stream is None:
                        await anyio.to_thread.run_sync(sink.open_sync)
                elif isinstance(claimed, tuple):
                    self._used(store, h)
                    stream = self._stream(store, h, *claimed)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await sink.abort()
                raise
            if stream is None:
                break
            sink.release()
            return stream
        opening = OPENING.set(OPENING.get() | {key})
        try:
            upstream = await open_upstream()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await sink.abort()
            raise
        finally:
            OPENING.reset(opening)
        sink.attach()
        extra = {}
        if link:  # the reader may link the committed entry instead of a second copy
            filled = FilledEntry(sink.take_committed, durable, open_upstream)
            extra[StreamAttribute.filled_entry] = lambda: filled
        return VerifyingStream(
            upstream, h, size, what=str(h), sinks=[sink], from_cache=False, extra=extra
        )

    # --- the Cache protocol ------------------------------------------------------

    async def put(self, layer: Layer) -> Layer:
        """A layer whose streams fill this cache as they are read (lazily)."""
        await self._ready()
        return TeeLayer(self, layer)

    async def get(self, h: Hash) -> Layer:
        """The cached layer stored under ``h`` (a digest or a diff_id)."""
        meta = await self._lookup(h)
        if meta is None:
            self._stats.misses += 1
            raise LayerNotFoundError(f"{h} is not in cache {self.path}")
        self._stats.hits += 1
        return cached_layer(self, h, meta)

    async def delete(self, h: Hash) -> None:
        """Remove the entry ``h``; :class:`LayerNotFoundError` if there is none.

        Whatever sits at the entry's name goes, also if it is not a regular file.
        """
        store = await self._peek()
        if store is None or not await anyio.to_thread.run_sync(_upkeep.remove, store, h):
            raise LayerNotFoundError(f"{h} is not in cache {self.path}")
