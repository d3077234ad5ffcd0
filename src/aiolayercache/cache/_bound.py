"""A byte budget for a cache directory: least recently used entries go while processes run.

The directory's total lives in a small file (``.aiolayercache/usage``) that
every process sharing the directory updates under ``flock``: a commit adds
its entry's size, an eviction takes it away, so a commit costs O(1) work
and each process sees what the others added. Victims come from an
in-memory index ordered by last use (this process's hits and commits move
an entry to the end); the index and the total are rebuilt from a scan of
the directory now and then (every ``REFRESH_COMMITS`` commits or
``REFRESH_SECONDS``), and whenever the index runs out of victims, which
also corrects any drift (a killed process, ``cache rm``, ``prune``).

An evicted entry is unlinked: a reader in any process that has it open
keeps streaming it (POSIX keeps the bytes for open descriptors). An entry
that tasks of this process wait to open (they waited on its fill) is not
evicted until they have. The entry
being committed is never its own victim, so one bigger than the whole
budget stays until the next commit: the readers waiting on its fill (many
pulls of images that share it) read it once from there instead of each
fetching it (one warning).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from .._hash import Hash
from . import _upkeep
from ._proofs import ProofStore

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process total
    fcntl = None  # type: ignore[assignment]

__all__ = ["Budget"]

log = logging.getLogger("aiolayercache.cache")

REFRESH_COMMITS = 256
REFRESH_SECONDS = 30.0


class Budget:
    """Keeps the entries of ``store`` within ``max_bytes``; every method blocks (a thread)."""

    def __init__(
        self,
        store: ProofStore,
        state_dir: str,
        max_bytes: int,
        pinned: Callable[[Hash], bool] = lambda h: False,
    ) -> None:
        self.store = store
        self._pinned = pinned  # entries tasks of this process are waiting to open
        self.max_bytes = max_bytes
        self._usage = os.path.join(state_dir, "usage")
        self._index: OrderedDict[Hash, int] = OrderedDict()  # oldest use first
        self._loaded_at = -1e9
        self._commits = 0
        self.evictions = 0
        self._warned_big = False
        self._shared = True  # the usage file works (else: _local, this process's count)
        self._local = 0
        self.lock = threading.Lock()  # the index is used from the loop and from threads

    # --- the shared total -----------------------------------------------------------------

    def _add(self, delta: int | None, absolute: int | None = None) -> int:
        """Add ``delta`` to the shared total (or set it); the new total.

        A ``usage`` that cannot be used (a symlink, a directory, a FIFO, no
        permission) never fails a commit: this process then keeps its own
        count (one warning) and keeps its own bound by it.
        """
        if self._shared:
            try:
                return self._add_shared(delta, absolute)
            except OSError as exc:
                self._shared = False
                log.warning(
                    "cache %s: %s cannot be used (%s); this process counts on its own",
                    self.store.label,
                    self._usage,
                    exc.strerror or exc,
                )
        total = absolute if absolute is not None else max(0, self._local + (delta or 0))
        self._local = total
        return total

    def _add_shared(self, delta: int | None, absolute: int | None) -> int:
        fd = os.open(self._usage, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 32, 0)
            try:
                total = int(raw.decode().strip() or 0)
            except ValueError:
                total = 0
            total = absolute if absolute is not None else max(0, total + (delta or 0))
            data = b"%d\n" % total
            os.pwrite(fd, data.ljust(32), 0)
            return total
        finally:
            os.close(fd)  # (closing releases the lock)

    # --- the index ------------------------------------------------------------------------

    def refresh(self) -> int:
        """Rebuild the index and the shared total from the directory; the total."""
        found = _upkeep.entries(self.store)  # newest first
        self._index = OrderedDict((e.digest, e.size) for e in reversed(found))
        self._loaded_at = time.monotonic()
        self._commits = 0
        return self._add(None, absolute=sum(e.size for e in found))

    def used(self, h: Hash) -> None:
        with self.lock:
            if h in self._index:
                self._index.move_to_end(h)

    def committed(self, h: Hash, size: int) -> None:
        """Count entry ``h`` in, then evict until the directory is within the budget."""
        with self.lock:
            self._committed(h, size)

    def _committed(self, h: Hash, size: int) -> None:
        stale = (
            self._commits >= REFRESH_COMMITS or time.monotonic() - self._loaded_at > REFRESH_SECONDS
        )
        # (a refresh's scan sees the new entry already)
        total = self.refresh() if stale else self._add(size)
        self._index[h] = size
        self._index.move_to_end(h)
        self._commits += 1
        if size > self.max_bytes and not self._warned_big:
            self._warned_big = True
            log.warning(
                "cache %s: %s (%d bytes) is bigger than the cache's bound (%d): it is kept "
                "only until the next entry comes in",
                self.store.label,
                h,
                size,
                self.max_bytes,
            )
        rescanned = stale
        while total > self.max_bytes:
            victim = next((v for v in self._index if v != h and not self._pinned(v)), None)
            if victim is None:
                if rescanned:
                    return  # nothing else to evict (others' fills in flight)
                total, rescanned = self.refresh(), True
                continue
            total = self._evict(victim, self._index[victim])

    def trim(self) -> None:
        """Evict until within the budget (after pinned entries were let go)."""
        with self.lock:
            total = self._add(0)
            while total > self.max_bytes:
                victim = next((v for v in self._index if not self._pinned(v)), None)
                if victim is None:
                    return
                total = self._evict(victim, self._index[victim])

    def _evict(self, h: Hash, size: int) -> int:
        self._index.pop(h, None)
        entry = self.store.entry(h)
        try:
            st = os.lstat(entry)
            os.unlink(entry)
        except FileNotFoundError:
            return self._add(0)  # gone already: whoever removed it counted it out
        self.evictions += 1
        self.store.forget(entry)
        return self._add(-st.st_size)
